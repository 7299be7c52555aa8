// CPU implementation of the cluster-masking sweep's ops (see csrc/cluster_sweep.h).
//
// All three are memory-bound and embarrassingly parallel, so each is one OpenMP loop over independent outputs:
//   occlude         one task per output plane (copy of image i, window n, channel c): rows outside the clipped box
//                   are one memcpy, rows through it a copy / fill / copy; the input is copied bit-exactly.
//   cluster_drop    rows in chunks; one pass over each feature row gives the dot product with the centroid and
//                   the row's squared norm together (an `omp simd` reduction, so float sums vectorise); the N
//                   centroid norms are computed once first. Nothing of size (N·W) × N is ever formed.
//   occlusion_heat  the per-pixel cover count once (it does not depend on the image), then one task per
//                   (image, row): the drops of the windows through that row are added into the output row, which
//                   is then divided by the count (the reference's `total / count.clamp_min(1)`).
// Windows are clipped to the image once per call (clipped_box). Conversions from / to bfloat16 and float16 are
// mask_step_math.h's (round-to-nearest-even, as torch). On x86-64 Linux with GCC, the arithmetic loops get an
// AVX2/FMA clone chosen at load time, as in mask_step.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../cluster_sweep.h"
#include "../mask_step_math.h"

// The same function multiversioning as mask_step.cpp (macros are per translation unit).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define TG_SWEEP_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TG_SWEEP_MULTIVERSION
#endif

namespace trojanguard {
namespace {

constexpr int64_t kDropRowsPerTask = 16;  // feature rows per cluster_drop task: amortises the per-task call

int thread_count(int num_threads) {
#ifdef _OPENMP
  return std::max(1, num_threads);
#else
  (void)num_threads;
  return 1;
#endif
}

std::vector<Box> clipped_boxes(const int64_t* windows, int64_t count, int64_t height, int64_t width) {
  std::vector<Box> boxes(static_cast<size_t>(count));
  for (int64_t n = 0; n < count; ++n) {
    Box b = clipped_box(windows, n, height, width);
    if (b.x0 == b.x1) b.y1 = b.y0;  // empty: no row of it fills anything
    boxes[static_cast<size_t>(n)] = b;
  }
  return boxes;
}

// ------------------------------------------------------------------ occlude
// One output plane: `src` (H × Wd) with box `b` set to `fill`.
template <typename T>
void occlude_plane(const T* __restrict__ src, T fill, const Box& b, int64_t width, int64_t height,
                   T* __restrict__ dst) {
  std::memcpy(dst, src, static_cast<size_t>(b.y0 * width) * sizeof(T));
  const int64_t right = width - b.x1;
  for (int64_t y = b.y0; y < b.y1; ++y) {
    const T* s = src + y * width;
    T* d = dst + y * width;
    std::memcpy(d, s, static_cast<size_t>(b.x0) * sizeof(T));
    std::fill(d + b.x0, d + b.x1, fill);
    std::memcpy(d + b.x1, s + b.x1, static_cast<size_t>(right) * sizeof(T));
  }
  std::memcpy(dst + b.y1 * width, src + b.y1 * width, static_cast<size_t>((height - b.y1) * width) * sizeof(T));
}

template <typename T>
void occlude_typed(const OccludeArgs& a, const std::vector<Box>& boxes, int threads) {
  const int64_t C = a.channels, W = a.windows_count, HW = a.height * a.width;
  const int64_t planes = a.batch * W * C;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && planes > 1)
  for (int64_t p = 0; p < planes; ++p) {  // p = (i·W + n)·C + c: output planes in memory order
    const int64_t c = p % C, n = (p / C) % W, i = p / (C * W);
    const float value = a.values[i * C + c];
    T fill;
    if constexpr (sizeof(T) == sizeof(float)) {
      fill = value;
    } else {
      fill = a.x_dtype == kBFloat16 ? float_to_bf16_bits(value) : float_to_half_bits(value);
    }
    occlude_plane(x + (i * C + c) * HW, fill, boxes[static_cast<size_t>(n)], a.width, a.height, out + p * HW);
  }
}

// ------------------------------------------------------------------ cluster_drop
// Element loaders of a feature row: float32 as is, bfloat16 / float16 through mask_step_math.h's conversions.
struct LoadF32 {
  using T = float;
  static TG_HD float load(float v) { return v; }
};
struct LoadBF16 {
  using T = uint16_t;
  static TG_HD float load(uint16_t v) { return bf16_bits_to_float(v); }
};
struct LoadF16 {
  using T = uint16_t;
  static TG_HD float load(uint16_t v) { return half_bits_to_float(v); }
};

// Σ f·c and Σ f² over one row, in one pass (float32 lanes, summed at the end by the simd reduction).
template <class Load>
TG_HD void dot_and_square(const typename Load::T* __restrict__ f, const float* __restrict__ c, int64_t dim,
                          float& dot_out, float& square_out) {
  float dot = 0.0f, square = 0.0f;
#pragma omp simd reduction(+ : dot, square)
  for (int64_t k = 0; k < dim; ++k) {
    const float v = Load::load(f[k]);
    dot += v * c[k];
    square += v * v;
  }
  dot_out = dot;
  square_out = square;
}

template <class Load>
TG_HD void drop_rows(const ClusterDropArgs& a, const float* __restrict__ centroid_norms, int64_t r0, int64_t r1) {
  const int64_t W = a.windows_count, D = a.dim;
  const typename Load::T* features = static_cast<const typename Load::T*>(a.features);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r / W;
    float dot, square;
    dot_and_square<Load>(features + r * D, a.centroids + i * D, D, dot, square);
    const float norm = std::max(std::sqrt(square), kNormalizeEps);
    a.out[r] = a.base[i] - dot / (norm * centroid_norms[i]);
  }
}

// Rows [r0, r1) of out; `centroid_norms`: max(‖c_i‖, eps) per image.
TG_SWEEP_MULTIVERSION
void drop_task(const ClusterDropArgs& a, const float* centroid_norms, int64_t r0, int64_t r1) {
  if (a.features_dtype == kFloat32) {
    drop_rows<LoadF32>(a, centroid_norms, r0, r1);
  } else if (a.features_dtype == kBFloat16) {
    drop_rows<LoadBF16>(a, centroid_norms, r0, r1);
  } else {
    drop_rows<LoadF16>(a, centroid_norms, r0, r1);
  }
}

TG_SWEEP_MULTIVERSION
float centroid_norm(const float* c, int64_t dim) {
  float dot, square;
  dot_and_square<LoadF32>(c, c, dim, dot, square);
  return std::max(std::sqrt(square), kNormalizeEps);
}

// ------------------------------------------------------------------ occlusion_heat
// Adds `value` over columns [x0, x1) of the boxes of `boxes` through row y; value 1 when `drops` is nullptr
// (the cover count), else drops[n].
TG_SWEEP_MULTIVERSION
void accumulate_row(const std::vector<Box>& boxes, const float* drops, int64_t y, float* __restrict__ row) {
  const int64_t W = static_cast<int64_t>(boxes.size());
  for (int64_t n = 0; n < W; ++n) {
    const Box& b = boxes[static_cast<size_t>(n)];
    if (y < b.y0 || y >= b.y1) continue;
    const float value = drops ? drops[n] : 1.0f;
    for (int64_t x = b.x0; x < b.x1; ++x) row[x] += value;
  }
}

TG_SWEEP_MULTIVERSION
void divide_row(const float* __restrict__ count, int64_t width, float* __restrict__ row) {
  for (int64_t x = 0; x < width; ++x) row[x] = row[x] / std::max(count[x], 1.0f);
}

}  // namespace

void occlude_cpu(const OccludeArgs& a, int num_threads) {
  if (a.batch == 0 || a.windows_count == 0 || a.channels == 0 || a.height == 0 || a.width == 0) return;
  const std::vector<Box> boxes = clipped_boxes(a.windows, a.windows_count, a.height, a.width);
  if (a.x_dtype == kFloat32) {
    occlude_typed<float>(a, boxes, thread_count(num_threads));
  } else {
    occlude_typed<uint16_t>(a, boxes, thread_count(num_threads));
  }
}

void cluster_drop_cpu(const ClusterDropArgs& a, int num_threads) {
  const int64_t N = a.batch, rows = a.batch * a.windows_count;
  if (rows == 0) return;
  const int threads = thread_count(num_threads);
  const int64_t tasks = (rows + kDropRowsPerTask - 1) / kDropRowsPerTask;
  std::vector<float> centroid_norms(static_cast<size_t>(N));
#pragma omp parallel num_threads(threads) if (threads > 1 && tasks > 1)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) centroid_norms[static_cast<size_t>(i)] = centroid_norm(a.centroids + i * a.dim, a.dim);
    // implicit barrier: every norm is there before a row uses it
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      drop_task(a, centroid_norms.data(), t * kDropRowsPerTask, std::min(rows, (t + 1) * kDropRowsPerTask));
    }
  }
}

void occlusion_heat_cpu(const OcclusionHeatArgs& a, int num_threads) {
  const int64_t N = a.batch, H = a.height, Wd = a.width;
  if (N == 0 || H == 0 || Wd == 0) return;
  const int threads = thread_count(num_threads);
  const std::vector<Box> boxes = clipped_boxes(a.windows, a.windows_count, H, Wd);
  std::vector<float> count(static_cast<size_t>(H * Wd), 0.0f);  // exact below 2^24 windows
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t y = 0; y < H; ++y) accumulate_row(boxes, nullptr, y, count.data() + y * Wd);
    // implicit barrier: the count is complete before any image divides by it
#pragma omp for schedule(static)
    for (int64_t task = 0; task < N * H; ++task) {  // task = i·H + y: output rows in memory order
      const int64_t i = task / H, y = task % H;
      float* row = a.out + task * Wd;
      std::fill(row, row + Wd, 0.0f);
      accumulate_row(boxes, a.drops + i * a.windows_count, y, row);
      divide_row(count.data() + y * Wd, Wd, row);
    }
  }
}

}  // namespace trojanguard
