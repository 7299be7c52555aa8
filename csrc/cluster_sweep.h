// The cluster-masking sweep of PoisonCAM (trojanguard/ops/cluster_mask.py is the oracle), as three ops shared by
// the bindings, the CPU and the CUDA implementation:
//   occlude         every image with every window filled by its per-channel value: the encoder's masked copies;
//   cluster_drop    base − cos(feature row, own centroid) per masked copy: the window drops;
//   occlusion_heat  per pixel, the mean drop of the windows covering it: the heat maps.
// Shapes: N images, C channels, H × Wd pixels, W windows (int64 rows top, left, height, width), D features.
#pragma once

#include <cstdint>

#include "mask_step_math.h"  // DType, TG_HD

namespace trojanguard {

// Raw views of contiguous tensors; all pointers are to memory on the device that runs the op.
struct OccludeArgs {
  const void* x;           // (N, C, H, Wd), x_dtype
  const int64_t* windows;  // (W, 4) boxes; may reach outside the image (clipped)
  const float* values;     // (N, C) fill of image i, channel c
  void* out;               // (N·W, C, H, Wd) out, x_dtype: row i·W + n is image i with window n filled
  int x_dtype;
  int64_t batch, channels, height, width, windows_count;  // N, C, H, Wd, W
};

struct ClusterDropArgs {
  const void* features;    // (N·W, D), features_dtype: row i·W + n is masked copy n of image i
  const float* centroids;  // (N, D) image i's own centroid (any norm)
  const float* base;       // (N,) a(x) of the unmasked images
  float* out;              // (N, W) out: base[i] − cos(features[i·W + n], centroids[i])
  int features_dtype;
  int64_t batch, windows_count, dim;  // N, W, D
};

struct OcclusionHeatArgs {
  const float* drops;      // (N, W)
  const int64_t* windows;  // (W, 4) boxes, as in OccludeArgs
  float* out;              // (N, H, Wd) out: mean drop of the windows covering each pixel, 0 where none does
  int64_t batch, windows_count, height, width;  // N, W, H, Wd
};

// torch.nn.functional.normalize's eps: a norm below it divides by eps instead.
constexpr float kNormalizeEps = 1e-12f;

// [lo, hi) = [start, start + length) ∩ [0, size), empty (lo == hi) when they do not meet; no overflow for any
// int64 start and length (the reference's masks are `start <= p < start + length`).
TG_HD void clip_span(int64_t start, int64_t length, int64_t size, int64_t& lo, int64_t& hi) {
  lo = start < 0 ? 0 : (start > size ? size : start);
  if (length <= 0) {
    hi = lo;
  } else if (start >= size - length) {  // start + length >= size, computed without overflow
    hi = size;
  } else {
    const int64_t end = start + length;  // < size: no overflow
    hi = end < lo ? lo : end;
  }
}

// Window `n` of `windows` clipped to an H × Wd image: rows [y0, y1), columns [x0, x1).
struct Box {
  int64_t y0, y1, x0, x1;
};

TG_HD Box clipped_box(const int64_t* windows, int64_t n, int64_t height, int64_t width) {
  Box b;
  clip_span(windows[4 * n + 0], windows[4 * n + 2], height, b.y0, b.y1);
  clip_span(windows[4 * n + 1], windows[4 * n + 3], width, b.x0, b.x1);
  return b;
}

// CPU: OpenMP over output planes (occlude), feature rows (cluster_drop) and (image, row) pairs (occlusion_heat).
void occlude_cpu(const OccludeArgs& args, int num_threads);
void cluster_drop_cpu(const ClusterDropArgs& args, int num_threads);
void occlusion_heat_cpu(const OcclusionHeatArgs& args, int num_threads);

#ifdef TROJANGUARD_WITH_CUDA
// CUDA: enqueued on `stream`; none of the three needs a workspace (the *_workspace_bytes bindings return 0).
void occlude_cuda(const OccludeArgs& args, int device, std::uintptr_t stream);
void cluster_drop_cuda(const ClusterDropArgs& args, int device, std::uintptr_t stream);
void occlusion_heat_cuda(const OcclusionHeatArgs& args, int device, std::uintptr_t stream);
#endif

}  // namespace trojanguard
