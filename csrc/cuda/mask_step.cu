// CUDA implementation of mask_step (see csrc/mask_step.h).
//
// Memory-bound design: θ, the Adam moments, x and the gradient are each read from DRAM once (x's second
// read, for the blend, hits L1), every output is written once, all accesses are row-contiguous and
// coalesced. One block owns a tile of rows of one (sample, mask channel) plane and walks it in chunks of
// whole rows; the OLD mask of a chunk plus one row either side sits in a shared-memory ring buffer, so θ
// is updated in place without feeding new values into the TV stencil. Rows just outside a tile belong to
// another block, which may already have overwritten them: when a plane is split into several tiles (few
// planes for the GPU), a first small launch copies the old masks of the rows either side of each tile
// boundary into a workspace. With enough planes every tile is a whole plane and there is one launch.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "../mask_step.h"
#include "../mask_step_math.h"

namespace trojanguard {
namespace {

constexpr int kThreads = 256;
constexpr int kMinBlocksPerSm = 4;        // caps registers at 64 per thread: enough warps in flight to hide DRAM latency
constexpr int64_t kChunkPixels = 4096;    // pixels per shared-memory chunk (whole rows)
constexpr int64_t kMinTilePixels = 1024;  // smaller tiles are not worth a halo launch
constexpr int64_t kBlocksPerSm = 16;      // split planes into tiles until the grid has about this many
constexpr int kPerChannelArrays = 5;      // δ, δ_next, mean, std (blend), std (gradient)

struct Plan {
  int64_t planes = 0, tiles = 1, chunk_rows = 1;
  int64_t boundaries() const { return tiles - 1; }
  int64_t halo_floats(int64_t width) const { return planes * boundaries() * 2 * width; }
  size_t shared_bytes(int64_t width, int64_t channels) const {
    return static_cast<size_t>((chunk_rows + 2) * width + kPerChannelArrays * channels) * sizeof(float);
  }
};

Plan make_plan(const MaskStepArgs& a, int sm_count) {
  Plan p;
  p.planes = a.batch * a.mask_channels;
  if (p.planes == 0 || a.height == 0 || a.width == 0) return p;
  p.chunk_rows = std::max<int64_t>(1, std::min<int64_t>(a.height, kChunkPixels / a.width));
  const int64_t target = kBlocksPerSm * sm_count;
  if (p.planes < target) {
    const int64_t by_size = std::max<int64_t>(1, a.height * a.width / kMinTilePixels);
    p.tiles = std::min({(target + p.planes - 1) / p.planes, by_size, a.height});
  }
  return p;
}

int sm_count(int device) {
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    return 1;
  }
  return std::max(count, 1);
}

void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("trojanguard mask_step (CUDA): ") + what + ": " + cudaGetErrorString(error));
  }
}

__device__ __forceinline__ float load(const void* base, int dtype, int64_t index) {
  if (dtype == kFloat32) return __ldg(static_cast<const float*>(base) + index);
  const unsigned short bits = __ldg(static_cast<const unsigned short*>(base) + index);
  return dtype == kBFloat16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
}

__device__ __forceinline__ void store(void* base, int dtype, int64_t index, float value) {
  if (dtype == kFloat32) {
    static_cast<float*>(base)[index] = value;
  } else {
    static_cast<uint16_t*>(base)[index] = dtype == kBFloat16 ? float_to_bf16_bits(value) : float_to_half_bits(value);
  }
}

// One block per (plane, tile boundary): old masks of the rows just above and at the boundary.
__global__ void __launch_bounds__(kThreads)
halo_kernel(const float* __restrict__ theta, float* __restrict__ halo, int64_t tiles, int64_t height, int width) {
  const int64_t boundary = blockIdx.x, boundaries = tiles - 1;
  const int64_t plane = boundary / boundaries, row = (boundary % boundaries + 1) * height / tiles;
  const float* src = theta + (plane * height + row - 1) * width;  // rows row − 1 and row: 2W contiguous floats
  float* dst = halo + boundary * 2 * width;
  for (int k = threadIdx.x; k < 2 * width; k += blockDim.x) dst[k] = mask_from_theta(src[k]);
}

// One block per (plane, tile); see the file comment.
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
mask_step_kernel(const MaskStepArgs a, const float* __restrict__ halo, int64_t tiles, int chunk_rows) {
  extern __shared__ float shared[];
  const int64_t C = a.channels, M = a.mask_channels, H = a.height, HW = a.height * a.width;
  const int W = static_cast<int>(a.width);
  const int64_t plane = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const int64_t i = plane / M;
  const int64_t c_begin = M == 1 ? 0 : plane % M, c_end = M == 1 ? C : c_begin + 1;
  const int64_t r0 = tile * H / tiles, r1 = (tile + 1) * H / tiles;
  const int slots = chunk_rows + 2;

  float* ring = shared;  // old mask of row r in slot (r − r0 + 1) % slots
  float* s_delta = shared + slots * W;
  float* s_delta_next = s_delta + C;
  float* s_mean = s_delta_next + C;
  float* s_std_out = s_mean + C;
  float* s_std_grad = s_std_out + C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    s_delta[c] = a.delta[i * C + c];
    const float next = uniform_noise(a.seeds[i], a.next_step, c);
    s_delta_next[c] = next;
    if (tile == 0 && c >= c_begin && c < c_end) a.delta_next[i * C + c] = next;
    s_mean[c] = a.mean ? a.mean[c] : 0.0f;
    s_std_out[c] = a.mean ? a.std[c] : 1.0f;
    s_std_grad[c] = a.std ? a.std[c] : 1.0f;
  }

  float* theta = a.theta + plane * HW;
  float* exp_avg = a.exp_avg + plane * HW;
  float* exp_avg_sq = a.exp_avg_sq + plane * HW;
  const float* halo_plane = halo + plane * (tiles - 1) * 2 * W;
  const float* halo_top = tile > 0 ? halo_plane + (tile - 1) * 2 * W : nullptr;                   // row r0 − 1
  const float* halo_bottom = tile < tiles - 1 ? halo_plane + tile * 2 * W + W : nullptr;          // row r1
  const AdamScalars s{a.beta1, a.beta2, 1.0f - a.beta1, 1.0f - a.beta2, a.eps, a.step_size, a.bias_correction2_sqrt};
  const float tv_scale = a.tv_weight * static_cast<float>(2.0 / static_cast<double>(HW));
  auto slot = [&](int64_t row) { return static_cast<int>((row - r0 + 1) % slots) * W; };

  for (int64_t c0 = r0; c0 < r1; c0 += chunk_rows) {
    const int64_t c1 = min(c0 + chunk_rows, r1);
    // Old masks of rows c0 − 1 .. c1 (clamped to the image); a later chunk has c0 − 1 and c0 already.
    const int64_t lo = c0 == r0 ? max(c0 - 1, int64_t(0)) : c0 + 1, hi = min(c1, H - 1);
    for (int k = threadIdx.x; k < static_cast<int>(hi - lo + 1) * W; k += blockDim.x) {
      const int64_t row = lo + k / W;
      const int w = k % W;
      float m;
      if (row < r0) {
        m = halo_top[w];
      } else if (row >= r1) {
        m = halo_bottom[w];
      } else {
        m = mask_from_theta(theta[row * W + w]);  // not yet written: only rows < c0 are
      }
      ring[slot(row) + w] = m;
    }
    __syncthreads();

    for (int k = threadIdx.x; k < static_cast<int>(c1 - c0) * W; k += blockDim.x) {
      const int64_t h = c0 + k / W;
      const int w = k % W;
      const float* mid = ring + slot(h);
      const float m = mid[w];
      const float tv = (m - ring[slot(max(h - 1, int64_t(0))) + w]) + (m - ring[slot(min(h + 1, H - 1)) + w]) +
                       (m - mid[max(w - 1, 0)]) + (m - mid[min(w + 1, W - 1)]);
      const int64_t pixel = h * W + w;
      float data = 0.0f;
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t index = (i * C + c) * HW + pixel;
        data += load(a.grad, a.grad_dtype, index) / s_std_grad[c] * (load(a.x, a.x_dtype, index) - s_delta[c]);
      }
      const float grad = mask_gradient(data, a.l1_weight, tv_scale, tv, m);
      float ea = exp_avg[pixel], eas = exp_avg_sq[pixel];
      const float t = adam_update(theta[pixel], grad, ea, eas, s);
      exp_avg[pixel] = ea;
      exp_avg_sq[pixel] = eas;
      theta[pixel] = t;
      const float m_new = mask_from_theta(t);
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t index = (i * C + c) * HW + pixel;
        store(a.out, a.out_dtype, index,
              blend(load(a.x, a.x_dtype, index), m_new, s_delta_next[c], s_mean[c], s_std_out[c]));
      }
    }
    __syncthreads();  // the next chunk reuses ring slots
  }
}

}  // namespace

int64_t mask_step_cuda_workspace_bytes(const MaskStepArgs& a, int device) {
  return make_plan(a, sm_count(device)).halo_floats(a.width) * static_cast<int64_t>(sizeof(float));
}

void mask_step_cuda(const MaskStepArgs& a, int device, std::uintptr_t stream_handle, void* workspace) {
  if (a.width > kCudaMaxWidth || a.channels > kCudaMaxChannels) {
    throw std::invalid_argument("trojanguard mask_step (CUDA): width " + std::to_string(a.width) + " and channels " +
                                std::to_string(a.channels) + " must be at most " + std::to_string(kCudaMaxWidth) +
                                " and " + std::to_string(kCudaMaxChannels));
  }
  check(cudaSetDevice(device), "cudaSetDevice");
  const Plan p = make_plan(a, sm_count(device));
  if (p.planes == 0 || a.height == 0 || a.width == 0) return;
  if (p.tiles > 1 && workspace == nullptr) {
    throw std::invalid_argument("trojanguard mask_step (CUDA): a workspace of mask_step_cuda_workspace_bytes is needed");
  }
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  float* halo = static_cast<float*>(workspace);
  if (p.tiles > 1) {
    halo_kernel<<<static_cast<unsigned>(p.planes * p.boundaries()), kThreads, 0, stream>>>(
        a.theta, halo, p.tiles, a.height, static_cast<int>(a.width));
    check(cudaGetLastError(), "halo_kernel launch");
  }
  mask_step_kernel<<<static_cast<unsigned>(p.planes * p.tiles), kThreads, p.shared_bytes(a.width, a.channels),
                     stream>>>(a, halo, p.tiles, static_cast<int>(p.chunk_rows));
  check(cudaGetLastError(), "mask_step_kernel launch");
}

std::string cuda_probe() {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    cudaGetLastError();
    return cudaGetErrorString(error);
  }
  return count > 0 ? "" : "no CUDA device visible to the extension's CUDA runtime";
}

}  // namespace trojanguard
