// CUDA implementation of the cluster-masking sweep's ops (see csrc/cluster_sweep.h).
//
// Simple, memory-bound kernels, all accesses coalesced, no workspace:
//   occlude         one thread per output element (blocks cover kThreads pixels of one output plane: image,
//                   window, channel); the input is copied bit-exactly, the fill converted as torch would.
//   cluster_drop    one warp per feature row: lanes stride over the row (coalesced), accumulating f·c, f·f and
//                   c·c in float32 in one pass, then a shuffle reduction; the centroid row is shared by the W rows
//                   of an image, so it comes from L1/L2 after the first.
//   occlusion_heat  one thread per output pixel of one image; a block stages the clipped windows (and this image's
//                   drops) in shared memory in chunks, and every thread sums the drops and counts the windows that
//                   cover its pixel. The count is recomputed per image: it costs only the comparisons the sum
//                   makes anyway, and saves a workspace and a launch.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "../cluster_sweep.h"
#include "../mask_step_math.h"

namespace trojanguard {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride loops beyond this (and gridDim.x's limit)

void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("trojanguard cluster sweep (CUDA): ") + what + ": " +
                             cudaGetErrorString(error));
  }
}

// Box of cluster_sweep.h in int: coordinates are clipped to [0, H] and [0, Wd], and H·Wd < 2^31 (checked).
struct __align__(16) Box32 {
  int y0, y1, x0, x1;
};

__device__ __forceinline__ Box32 clipped_box32(const int64_t* windows, int64_t n, int64_t height, int64_t width) {
  const Box b = clipped_box(windows, n, height, width);
  return {static_cast<int>(b.y0), static_cast<int>(b.y1), static_cast<int>(b.x0), static_cast<int>(b.x1)};
}

void check_image_size(int64_t height, int64_t width, const char* op) {
  if (height * width > int64_t{INT32_MAX} - kThreads) {
    throw std::invalid_argument(std::string("trojanguard ") + op + " (CUDA): images of " + std::to_string(height) +
                                " x " + std::to_string(width) + " pixels are too large (at most 2^31 pixels)");
  }
}

unsigned grid_for(int64_t blocks) { return static_cast<unsigned>(std::min(std::max<int64_t>(blocks, 1), kMaxBlocks)); }

// ------------------------------------------------------------------ occlude
// T: float (float32 x) or unsigned short (the bits of bfloat16 / float16 x).
template <typename T>
__device__ __forceinline__ T fill_bits(float value, int dtype);

template <>
__device__ __forceinline__ float fill_bits<float>(float value, int) { return value; }

template <>
__device__ __forceinline__ unsigned short fill_bits<unsigned short>(float value, int dtype) {
  return dtype == kBFloat16 ? float_to_bf16_bits(value) : float_to_half_bits(value);
}

// Grid-stride over (output plane, tile of kThreads pixels); plane p = (i·W + n)·C + c is image i, channel c with
// window n filled.
template <typename T>
__global__ void __launch_bounds__(kThreads)
occlude_kernel(const OccludeArgs a) {
  const int64_t C = a.channels, W = a.windows_count;
  const int hw = static_cast<int>(a.height * a.width), width = static_cast<int>(a.width);
  const int64_t tiles = (hw + kThreads - 1) / kThreads, tasks = a.batch * W * C * tiles;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ out = static_cast<T*>(a.out);
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t p = task / tiles, c = p % C, n = (p / C) % W, i = p / (C * W);
    const int pixel = static_cast<int>(task % tiles) * kThreads + static_cast<int>(threadIdx.x);
    if (pixel >= hw) continue;
    const Box32 b = clipped_box32(a.windows, n, a.height, a.width);
    const int y = pixel / width, col = pixel - y * width;
    const bool inside = y >= b.y0 && y < b.y1 && col >= b.x0 && col < b.x1;
    out[p * hw + pixel] = inside ? fill_bits<T>(__ldg(a.values + i * C + c), a.x_dtype)
                                 : __ldg(x + (i * C + c) * hw + pixel);
  }
}

// ------------------------------------------------------------------ cluster_drop
template <typename T>
__device__ __forceinline__ float load_feature(const T* p, int dtype);

template <>
__device__ __forceinline__ float load_feature<float>(const float* p, int) { return __ldg(p); }

template <>
__device__ __forceinline__ float load_feature<unsigned short>(const unsigned short* p, int dtype) {
  const unsigned short bits = __ldg(p);
  return dtype == kBFloat16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
cluster_drop_kernel(const ClusterDropArgs a) {
  const int64_t W = a.windows_count, D = a.dim, rows = a.batch * W;
  const int lane = threadIdx.x % 32;
  const T* __restrict__ features = static_cast<const T*>(a.features);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {  // warp-uniform: the shuffles see all 32 lanes
    const int64_t i = r / W;
    const T* __restrict__ f = features + r * D;
    const float* __restrict__ c = a.centroids + i * D;
    float dot = 0.0f, ff = 0.0f, cc = 0.0f;
    for (int64_t k = lane; k < D; k += 32) {
      const float v = load_feature<T>(f + k, a.features_dtype), w = __ldg(c + k);
      dot += v * w;
      ff += v * v;
      cc += w * w;
    }
    dot = warp_sum(dot);
    ff = warp_sum(ff);
    cc = warp_sum(cc);
    if (lane == 0) {
      const float norms = fmaxf(sqrtf(ff), kNormalizeEps) * fmaxf(sqrtf(cc), kNormalizeEps);
      a.out[r] = __ldg(a.base + i) - dot / norms;
    }
  }
}

// ------------------------------------------------------------------ occlusion_heat
// Grid-stride over (image, tile of kThreads pixels); each chunk of kThreads windows is staged in shared memory.
__global__ void __launch_bounds__(kThreads)
occlusion_heat_kernel(const OcclusionHeatArgs a) {
  __shared__ Box32 s_box[kThreads];
  __shared__ float s_drop[kThreads];
  const int64_t W = a.windows_count;
  const int hw = static_cast<int>(a.height * a.width), width = static_cast<int>(a.width);
  const int64_t tiles = (hw + kThreads - 1) / kThreads, tasks = a.batch * tiles;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {  // block-uniform: every thread syncs
    const int64_t i = task / tiles;
    const int pixel = static_cast<int>(task % tiles) * kThreads + static_cast<int>(threadIdx.x);
    const int y = pixel / width, x = pixel - y * width;  // past the image for the last tile's spare threads
    float sum = 0.0f, count = 0.0f;
    for (int64_t n0 = 0; n0 < W; n0 += kThreads) {
      const int chunk = static_cast<int>(min(int64_t{kThreads}, W - n0));
      __syncthreads();  // the previous chunk (or task) is done with the shared arrays
      if (static_cast<int>(threadIdx.x) < chunk) {
        s_box[threadIdx.x] = clipped_box32(a.windows, n0 + threadIdx.x, a.height, a.width);
        s_drop[threadIdx.x] = __ldg(a.drops + i * W + n0 + threadIdx.x);
      }
      __syncthreads();
      for (int k = 0; k < chunk; ++k) {
        const Box32 b = s_box[k];
        if (y >= b.y0 && y < b.y1 && x >= b.x0 && x < b.x1) {
          sum += s_drop[k];
          count += 1.0f;
        }
      }
    }
    if (pixel < hw) a.out[i * hw + pixel] = sum / fmaxf(count, 1.0f);
  }
}

void prepare(int device) { check(cudaSetDevice(device), "cudaSetDevice"); }

}  // namespace

void occlude_cuda(const OccludeArgs& a, int device, std::uintptr_t stream_handle) {
  const int64_t planes = a.batch * a.windows_count * a.channels, hw = a.height * a.width;
  if (planes == 0 || hw == 0) return;
  check_image_size(a.height, a.width, "occlude");
  prepare(device);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const unsigned grid = grid_for(planes * ((hw + kThreads - 1) / kThreads));
  if (a.x_dtype == kFloat32) {
    occlude_kernel<float><<<grid, kThreads, 0, stream>>>(a);
  } else {
    occlude_kernel<unsigned short><<<grid, kThreads, 0, stream>>>(a);
  }
  check(cudaGetLastError(), "occlude_kernel launch");
}

void cluster_drop_cuda(const ClusterDropArgs& a, int device, std::uintptr_t stream_handle) {
  const int64_t rows = a.batch * a.windows_count;
  if (rows == 0) return;
  prepare(device);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const unsigned grid = grid_for((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (a.features_dtype == kFloat32) {
    cluster_drop_kernel<float><<<grid, kThreads, 0, stream>>>(a);
  } else {
    cluster_drop_kernel<unsigned short><<<grid, kThreads, 0, stream>>>(a);
  }
  check(cudaGetLastError(), "cluster_drop_kernel launch");
}

void occlusion_heat_cuda(const OcclusionHeatArgs& a, int device, std::uintptr_t stream_handle) {
  const int64_t HW = a.height * a.width;
  if (a.batch == 0 || HW == 0) return;
  check_image_size(a.height, a.width, "occlusion_heat");
  prepare(device);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  occlusion_heat_kernel<<<grid_for(a.batch * ((HW + kThreads - 1) / kThreads)), kThreads, 0, stream>>>(a);
  check(cudaGetLastError(), "occlusion_heat_kernel launch");
}

}  // namespace trojanguard
