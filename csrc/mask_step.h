// mask_step: one fused Cognitive Distillation mask-optimisation step (see trojanguard/ops/mask_step.py,
// whose mask_step_reference is the oracle). Shared by the bindings, the CPU and the CUDA implementation.
#pragma once

#include <cstdint>
#include <string>

namespace trojanguard {

// Raw views of contiguous tensors plus the step's scalars. All pointers are to memory on the device
// that runs the step; element types are DType codes (mask_step_math.h) where not float32.
struct MaskStepArgs {
  float* theta;       // (N, M, H, W) float32, updated in place
  float* exp_avg;     // (N, M, H, W) float32, updated in place
  float* exp_avg_sq;  // (N, M, H, W) float32, updated in place
  const void* x;      // (N, C, H, W) in [0, 1], x_dtype
  const float* delta;  // (N, C) colours of this step
  const void* grad;    // (N, C, H, W) ∂D/∂x_adv, grad_dtype
  const int64_t* seeds;  // (N,) per-sample RNG seeds
  const float* mean;     // (C,) or nullptr: x_adv is normalised with (mean, std) iff mean is given
  const float* std;      // (C,) or nullptr: the data gradient is divided by std iff std is given
  float* delta_next;     // (N, C) out: δ for step + 1
  void* out;             // (N, C, H, W) out: x_adv for step + 1, out_dtype
  int x_dtype, grad_dtype, out_dtype;
  int64_t batch, channels, mask_channels, height, width;  // N, C, M (1 or C), H, W
  float beta1, beta2, eps, l1_weight, tv_weight, step_size, bias_correction2_sqrt;
  int64_t next_step;  // Adam's step + 1: the RNG counter of δ_next
};

// CPU: OpenMP over (sample, mask channel) planes, split into row tiles when planes are few.
void mask_step_cpu(const MaskStepArgs& args, int num_threads);
bool cpu_has_openmp();
bool cpu_has_multiversioning();

#ifdef TROJANGUARD_WITH_CUDA
// CUDA: the caller allocates mask_step_cuda_workspace_bytes() on the device (0: none needed).
int64_t mask_step_cuda_workspace_bytes(const MaskStepArgs& args, int device);
void mask_step_cuda(const MaskStepArgs& args, int device, std::uintptr_t stream, void* workspace);
// Empty when the CUDA runtime linked into the extension can see a device, else why not.
std::string cuda_probe();
// The largest image width and channel count the CUDA kernel takes (its shared-memory buffers).
constexpr int64_t kCudaMaxWidth = 2048;
constexpr int64_t kCudaMaxChannels = 512;
#endif

}  // namespace trojanguard
