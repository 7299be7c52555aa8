// Scalar math shared by the CPU and CUDA mask_step kernels: one definition per concept.
//
// Everything here is branch-light so that the CPU loops calling it auto-vectorise (no libm calls, no
// data-dependent branches); under nvcc the same functions are __host__ __device__ and use CUDA
// intrinsics where those are exact.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define TG_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define TG_HD inline __attribute__((always_inline))
#else
#define TG_HD inline
#endif

namespace trojanguard {

// Element types of x, grad_xadv and x_adv; the Python side passes these codes.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

TG_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

TG_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// ------------------------------------------------------------------ counter-based RNG
// Wellons' lowbias32; must stay bit-identical to trojanguard.ops.mask_step._hash32.
TG_HD uint32_t hash32(uint32_t a) {
  a ^= a >> 16;
  a *= 0x7FEB352Du;
  a ^= a >> 15;
  a *= 0x846CA68Bu;
  a ^= a >> 16;
  return a;
}

// δ ~ U[0, 1) for (sample seed, step, channel): u = (h >> 8) / 2^24 with
// h = hash(hash(hash(seed) + step) + channel), all on uint32 (as uniform_noise in Python).
TG_HD float uniform_noise(int64_t seed, int64_t step, int64_t channel) {
  const uint32_t s = hash32(static_cast<uint32_t>(seed));
  const uint32_t h = hash32(hash32(s + static_cast<uint32_t>(step)) + static_cast<uint32_t>(channel));
  return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
}

// ------------------------------------------------------------------ exp and the tanh mask
// e^x in float32. Host: Cephes-style range reduction + degree-6 polynomial (about 1 ulp), written
// without libm calls or branches so loops over it vectorise; device: expf.
TG_HD float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float round_magic = 12582912.0f;  // 1.5 · 2^23: adding it rounds to an integer
  const float shifted = x * 1.44269504088896341f + round_magic;
  const float n = shifted - round_magic;
  const int32_t ni = static_cast<int32_t>(float_to_bits(shifted) - float_to_bits(round_magic));
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
#endif
}

// m = (tanh θ + 1) / 2, written as 1 − 1/(1 + e^{2θ}): same saturation to exactly 0 and 1 as the
// reference's float32 tanh.
TG_HD float mask_from_theta(float theta) { return 1.0f - 1.0f / (1.0f + exp_f32(2.0f * theta)); }

// ------------------------------------------------------------------ bfloat16 / float16 <-> float32
// Round-to-nearest-even, NaN to quiet NaN: the same results as torch's conversions.
TG_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

TG_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

TG_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  // Giesen's half_to_float: exact, including subnormals, inf and NaN.
  const uint32_t shifted_exp = 0x7C00u << 13;
  uint32_t o = (static_cast<uint32_t>(h) & 0x7FFFu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  const uint32_t inf_nan = o + ((128u - 16u) << 23);
  const float sub = bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23);
  o = exp == shifted_exp ? inf_nan : (exp == 0 ? float_to_bits(sub) : o);
  return bits_to_float(o | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
#endif
}

TG_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  // Giesen's float_to_half_fast3_rtne, with selects instead of branches.
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  const uint32_t f16max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t inf_nan = u > 0x7F800000u ? 0x7E00u : 0x7C00u;
  const uint32_t sub = float_to_bits(bits_to_float(u) + bits_to_float(denorm_magic)) - denorm_magic;
  const uint32_t mant_odd = (u >> 13) & 1u;
  const uint32_t normal = (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + mant_odd) >> 13;
  const uint32_t o = u >= f16max ? inf_nan : (u < (113u << 23) ? sub : normal);
  return static_cast<uint16_t>(o | (sign >> 16));
#endif
}

// ------------------------------------------------------------------ one pixel of the step
struct AdamScalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, bias_correction2_sqrt;
};

// ∂loss/∂θ at one pixel: (data + γ + β·tv) · 2m(1 − m); ``tv_sum`` = Σ_neighbours (m − m_nb),
// ``tv_scale`` = β · 2 / (H·W).
TG_HD float mask_gradient(float data, float l1_weight, float tv_scale, float tv_sum, float m) {
  return (data + l1_weight + tv_scale * tv_sum) * 2.0f * m * (1.0f - m);
}

// torch.optim.Adam's update of one parameter (no weight decay, not amsgrad); returns the new θ.
TG_HD float adam_update(float theta, float grad, float& exp_avg, float& exp_avg_sq, const AdamScalars& s) {
  exp_avg = exp_avg * s.beta1 + grad * s.one_minus_beta1;
  exp_avg_sq = exp_avg_sq * s.beta2 + s.one_minus_beta2 * grad * grad;
#if defined(__CUDA_ARCH__)
  const float root = sqrtf(exp_avg_sq);
#else
  const float root = __builtin_sqrtf(exp_avg_sq);  // -fno-math-errno lets this vectorise
#endif
  const float denom = root / s.bias_correction2_sqrt + s.eps;
  return theta - s.step_size * (exp_avg / denom);
}

// x_adv = (x·m + (1 − m)·δ − mean) / std; mean = 0, std = 1 when the model has no normalisation.
TG_HD float blend(float x, float m, float delta, float mean, float std) {
  return (x * m + (1.0f - m) * delta - mean) / std;
}

}  // namespace trojanguard
