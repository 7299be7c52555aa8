// CPU implementation of mask_step (see csrc/mask_step.h).
//
// Work is split into (sample, mask channel) planes, and each plane into row tiles when there are too few
// planes to keep every thread busy. A tile walks its rows top to bottom keeping a rolling buffer of three
// rows of the OLD mask (above, current, below; replicate-padded so missing neighbours contribute zero to
// the TV stencil), so writing θ in place never feeds a new value into a neighbour's gradient. Rows just
// outside a tile belong to another thread, which may already have overwritten them: their old masks are
// computed into a halo buffer first, behind a barrier. Inner loops are plain elementwise loops over one
// row, which GCC/Clang auto-vectorise; on x86-64 Linux an AVX2/FMA clone is picked at load time.
#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../mask_step.h"
#include "../mask_step_math.h"

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define TG_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#define TG_HAS_MULTIVERSION 1
#else
#define TG_MULTIVERSION
#define TG_HAS_MULTIVERSION 0
#endif

#if defined(__clang__)
#define TG_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define TG_IVDEP _Pragma("GCC ivdep")
#else
#define TG_IVDEP
#endif

namespace trojanguard {
namespace {

constexpr int64_t kTasksPerThread = 4;  // row tiles per thread when planes are scarce
constexpr int64_t kMinTileRows = 4;     // smaller tiles spend more on halos than they gain

// Row of `n` elements at `offset` as float32: the row itself for float32, else converted into `scratch`.
TG_HD const float* row_as_float(const void* base, int dtype, int64_t offset, int64_t n,
                                float* __restrict__ scratch) {
  if (dtype == kFloat32) return static_cast<const float*>(base) + offset;
  const uint16_t* __restrict__ src = static_cast<const uint16_t*>(base) + offset;
  if (dtype == kBFloat16) {
    TG_IVDEP for (int64_t k = 0; k < n; ++k) scratch[k] = bf16_bits_to_float(src[k]);
  } else {
    TG_IVDEP for (int64_t k = 0; k < n; ++k) scratch[k] = half_bits_to_float(src[k]);
  }
  return scratch;
}

TG_HD void store_row(void* base, int dtype, int64_t offset, int64_t n, const float* __restrict__ src) {
  uint16_t* __restrict__ dst = static_cast<uint16_t*>(base) + offset;
  if (dtype == kBFloat16) {
    TG_IVDEP for (int64_t k = 0; k < n; ++k) dst[k] = float_to_bf16_bits(src[k]);
  } else {
    TG_IVDEP for (int64_t k = 0; k < n; ++k) dst[k] = float_to_half_bits(src[k]);
  }
}

// Mask of one θ row into a replicate-padded row of width + 2.
TG_HD void mask_row(const float* __restrict__ theta, int64_t width, float* __restrict__ padded) {
  TG_IVDEP for (int64_t w = 0; w < width; ++w) padded[w + 1] = mask_from_theta(theta[w]);
  padded[0] = padded[1];
  padded[width + 1] = padded[width];
}

TG_HD void copy_row(const float* __restrict__ src, int64_t n, float* __restrict__ dst) {
  std::copy(src, src + n, dst);
}

// data += g / std · (x − δ) over one row.
TG_HD void accumulate_data_term(const float* __restrict__ x, const float* __restrict__ g, float delta,
                                float std, int64_t n, float* __restrict__ data) {
  TG_IVDEP for (int64_t w = 0; w < n; ++w) data[w] += g[w] / std * (x[w] - delta);
}

// Gradient (from the old mask rows), Adam in place and the new mask of one row.
TG_HD void update_row(const float* __restrict__ up, const float* __restrict__ mid, const float* __restrict__ down,
                      const float* __restrict__ data, float l1_weight, float tv_scale, const AdamScalars& s,
                      int64_t n, float* __restrict__ theta, float* __restrict__ exp_avg,
                      float* __restrict__ exp_avg_sq, float* __restrict__ mask_new) {
  TG_IVDEP for (int64_t w = 0; w < n; ++w) {
    const float m = mid[w + 1];
    const float tv = (m - up[w + 1]) + (m - down[w + 1]) + (m - mid[w]) + (m - mid[w + 2]);
    const float grad = mask_gradient(data[w], l1_weight, tv_scale, tv, m);
    float ea = exp_avg[w], eas = exp_avg_sq[w];
    const float t = adam_update(theta[w], grad, ea, eas, s);
    exp_avg[w] = ea;
    exp_avg_sq[w] = eas;
    theta[w] = t;
    mask_new[w] = mask_from_theta(t);
  }
}

TG_HD void blend_row(const float* __restrict__ x, const float* __restrict__ m, float delta, float mean, float std,
                     int64_t n, float* __restrict__ out) {
  TG_IVDEP for (int64_t w = 0; w < n; ++w) out[w] = blend(x[w], m[w], delta, mean, std);
}

int64_t workspace_floats(const MaskStepArgs& a) {
  // 3 padded mask rows, C converted x rows, 1 converted grad row, data term, new mask, output row.
  return 3 * (a.width + 2) + (a.channels + 4) * a.width;
}

// Old masks of the two rows either side of a tile boundary (row - 1, row), padded, into `dst`.
TG_MULTIVERSION
void halo_rows(const float* theta_plane, int64_t row, int64_t width, float* dst) {
  mask_row(theta_plane + (row - 1) * width, width, dst);
  mask_row(theta_plane + row * width, width, dst + width + 2);
}

// Rows [r0, r1) of one plane; `halo_top` / `halo_bottom`: old masks of rows r0 − 1 / r1 (nullptr at edges).
TG_MULTIVERSION
void run_tile(const MaskStepArgs& a, int64_t plane, int64_t r0, int64_t r1, const float* halo_top,
              const float* halo_bottom, float* ws) {
  const int64_t C = a.channels, M = a.mask_channels, H = a.height, W = a.width, HW = H * W;
  const int64_t i = plane / M;
  const int64_t c_begin = M == 1 ? 0 : plane % M, c_count = M == 1 ? C : 1;
  const int64_t padded = W + 2;
  float* rows[3] = {ws, ws + padded, ws + 2 * padded};
  float* x_rows = ws + 3 * padded;  // c_count rows of x as float32 (when x is not float32)
  float* g_row = x_rows + C * W;
  float* data = g_row + W;
  float* mask_new = data + W;
  float* out_row = mask_new + W;

  float* theta = a.theta + plane * HW;
  float* exp_avg = a.exp_avg + plane * HW;
  float* exp_avg_sq = a.exp_avg_sq + plane * HW;
  const AdamScalars s{a.beta1,    a.beta2,     1.0f - a.beta1,         1.0f - a.beta2,
                      a.eps,      a.step_size, a.bias_correction2_sqrt};
  const float tv_scale = a.tv_weight * static_cast<float>(2.0 / static_cast<double>(HW));

  float *up = rows[0], *mid = rows[1], *down = rows[2];
  mask_row(theta + r0 * W, W, mid);
  copy_row(r0 == 0 ? mid : halo_top, padded, up);
  for (int64_t h = r0; h < r1; ++h) {
    if (h + 1 < r1) {
      mask_row(theta + (h + 1) * W, W, down);  // still old: only rows <= h were written
    } else {
      copy_row(h + 1 < H ? halo_bottom : mid, padded, down);
    }
    const int64_t row = h * W;

    std::fill(data, data + W, 0.0f);
    for (int64_t k = 0; k < c_count; ++k) {
      const int64_t c = c_begin + k, offset = (i * C + c) * HW + row;
      const float* x = row_as_float(a.x, a.x_dtype, offset, W, x_rows + k * W);
      const float* g = row_as_float(a.grad, a.grad_dtype, offset, W, g_row);
      accumulate_data_term(x, g, a.delta[i * C + c], a.std ? a.std[c] : 1.0f, W, data);
    }

    update_row(up, mid, down, data, a.l1_weight, tv_scale, s, W, theta + row, exp_avg + row, exp_avg_sq + row,
               mask_new);

    for (int64_t k = 0; k < c_count; ++k) {
      const int64_t c = c_begin + k, offset = (i * C + c) * HW + row;
      const float* x = a.x_dtype == kFloat32 ? static_cast<const float*>(a.x) + offset : x_rows + k * W;
      const float mean = a.mean ? a.mean[c] : 0.0f, std = a.mean ? a.std[c] : 1.0f;
      if (a.out_dtype == kFloat32) {
        blend_row(x, mask_new, a.delta_next[i * C + c], mean, std, W, static_cast<float*>(a.out) + offset);
      } else {
        blend_row(x, mask_new, a.delta_next[i * C + c], mean, std, W, out_row);
        store_row(a.out, a.out_dtype, offset, W, out_row);
      }
    }

    float* recycled = up;
    up = mid;
    mid = down;
    down = recycled;
  }
}

}  // namespace

void mask_step_cpu(const MaskStepArgs& a, int num_threads) {
  const int64_t N = a.batch, C = a.channels, H = a.height, W = a.width;
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t c = 0; c < C; ++c) a.delta_next[i * C + c] = uniform_noise(a.seeds[i], a.next_step, c);
  }
  const int64_t planes = N * a.mask_channels;
  if (planes == 0 || H == 0 || W == 0) return;

#ifdef _OPENMP
  const int64_t threads = std::max(1, num_threads);
#else
  const int64_t threads = 1;
  (void)num_threads;
#endif
  int64_t tiles = 1;
  if (planes < kTasksPerThread * threads) {
    tiles = std::min((kTasksPerThread * threads + planes - 1) / planes, std::max<int64_t>(1, H / kMinTileRows));
  }
  const int64_t padded = W + 2, boundaries = tiles - 1, ws_floats = workspace_floats(a);
  std::vector<float> halos(static_cast<size_t>(planes * boundaries * 2 * padded));
  std::vector<float> workspace(static_cast<size_t>(threads * ws_floats));

#pragma omp parallel num_threads(static_cast<int>(threads)) if (threads > 1)
  {
#ifdef _OPENMP
    float* ws = workspace.data() + omp_get_thread_num() * ws_floats;
#else
    float* ws = workspace.data();
#endif
    if (boundaries > 0) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < planes * boundaries; ++b) {
        const int64_t plane = b / boundaries, tile = b % boundaries + 1;
        halo_rows(a.theta + plane * H * W, tile * H / tiles, W, halos.data() + b * 2 * padded);
      }  // implicit barrier: every halo is read before any θ is written
    }
#pragma omp for schedule(static)
    for (int64_t task = 0; task < planes * tiles; ++task) {
      const int64_t plane = task / tiles, tile = task % tiles;
      const float* first = halos.data() + plane * boundaries * 2 * padded;
      const float* top = tile > 0 ? first + (tile - 1) * 2 * padded : nullptr;
      const float* bottom = tile < boundaries ? first + tile * 2 * padded + padded : nullptr;
      run_tile(a, plane, tile * H / tiles, (tile + 1) * H / tiles, top, bottom, ws);
    }
  }
}

bool cpu_has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

bool cpu_has_multiversioning() { return TG_HAS_MULTIVERSION; }

}  // namespace trojanguard
