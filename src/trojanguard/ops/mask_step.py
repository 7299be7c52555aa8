"""Mask-optimisation ops of Cognitive Distillation, with pure-PyTorch references beside the dispatch.

Shapes: images ``x: (N, C, H, W)`` in [0, 1]; mask parameter ``theta: (N, M, H, W)`` with M = 1 (one mask
broadcast over channels) or M = C; mask ``m = (tanh θ + 1) / 2``; flat colours ``delta: (N, C, 1, 1)``.
The blend is ``x_adv = (x·m + (1 − m)·δ − mean) / std``: the model's per-channel normalisation (if any)
is folded in, so δ lives in pixel space and every input the network sees gets the same preprocessing.

Per-sample loss (METHODS.md §1): ``D_i + γ·Σ m_i + β·TV(m_i)``. The data term's gradient ``g = ∂D/∂x_adv``
comes from the network; :func:`mask_step` does everything else of one optimisation step in one pass:
mask gradient (channel reduction + L1 + TV stencil + tanh chain rule), Adam on θ, the next δ from a
counter-based RNG and the next ``x_adv``. Losses are summed over samples (not averaged), so samples are
exactly independent of batch size and composition; Adam is scale-invariant, so this matches the
authors' batch mean up to Adam's ε.

Backends: the reference here, the Triton kernel (``trojanguard._kernels.mask_step``) and the C++ CPU / CUDA
kernels of ``trojanguard._C``, whose glue (validation, contiguous copies, outputs allocated with torch and the
custom op ``torch.ops.trojanguard.mask_step`` with its fake implementation) is at the end of this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trojanguard import _native
from trojanguard.ops._backends import define_op, triton_reasons

MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class MaskStepParams:
    """Scalars of one step. ``step`` is Adam's 1-based step count; δ for step t+1 is drawn after it."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    l1_weight: float  # γ, per unnormalised mask sum
    tv_weight: float  # β
    step: int

    @property
    def step_size(self) -> float:
        return self.lr / (1 - self.beta1**self.step)

    @property
    def bias_correction2_sqrt(self) -> float:
        return (1 - self.beta2**self.step) ** 0.5


# ---------------------------------------------------------------- counter-based RNG (shared by backends)
def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a · c) mod 2³² for int64 tensors holding uint32 values, without signed overflow."""
    lo, hi = a & 0xFFFF, a >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def _hash32(a: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 integer hash on uint32 values held in int64."""
    a = a & MASK32
    a = a ^ (a >> 16)
    a = _mul32(a, 0x7FEB352D)
    a = a ^ (a >> 15)
    a = _mul32(a, 0x846CA68B)
    return a ^ (a >> 16)


def uniform_noise(seeds: torch.Tensor, step: int, channels: int) -> torch.Tensor:
    """δ ~ U[0, 1) of shape ``(N, channels, 1, 1)``: a pure function of (sample seed, step, channel).

    ``u = (h >> 8) / 2²⁴`` with ``h = hash(hash(hash(seed) + step) + c)`` — exactly representable in float32,
    so every backend draws bit-identical δ.
    """
    s = _hash32(seeds.to(torch.int64).view(-1, 1))
    c = torch.arange(channels, dtype=torch.int64, device=seeds.device).view(1, -1)
    h = _hash32(_hash32(s + step) + c)
    return ((h >> 8).to(torch.float32) * (1.0 / 16777216.0)).view(-1, channels, 1, 1)


# ---------------------------------------------------------------- references
def mask_from_theta(theta: torch.Tensor) -> torch.Tensor:
    """m = (tanh θ + 1) / 2 in (0, 1)."""
    return (torch.tanh(theta) + 1) / 2


def blend_reference(x: torch.Tensor, mask: torch.Tensor, delta: torch.Tensor,
                    mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> torch.Tensor:
    """x_adv = (x·m + (1 − m)·δ − mean) / std; ``mean``, ``std``: (C,) or None (no normalisation)."""
    out = x * mask + (1 - mask) * delta
    if mean is not None:
        out = (out - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return out


def regularizer_reference(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (Σ m, TV(m)), TV = [Σ(m(h+1,w) − m(h,w))² + Σ(m(h,w+1) − m(h,w))²] / (H·W); each (N,)."""
    h, w = mask.shape[-2:]
    dh = (mask[..., 1:, :] - mask[..., :-1, :]).pow(2).flatten(1).sum(1)
    dw = (mask[..., :, 1:] - mask[..., :, :-1]).pow(2).flatten(1).sum(1)
    return mask.flatten(1).sum(1), (dh + dw) / (h * w)


def tv_gradient_reference(mask: torch.Tensor) -> torch.Tensor:
    """∂TV/∂m: (2 / (H·W)) times the 5-point stencil Σ_neighbours (m − m_neighbour), edges clamped."""
    h, w = mask.shape[-2:]
    grad = torch.zeros_like(mask)
    dh = mask[..., 1:, :] - mask[..., :-1, :]
    dw = mask[..., :, 1:] - mask[..., :, :-1]
    grad[..., 1:, :] += dh
    grad[..., :-1, :] -= dh
    grad[..., :, 1:] += dw
    grad[..., :, :-1] -= dw
    return grad * (2.0 / (h * w))


def mask_gradient_reference(theta: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, grad_xadv: torch.Tensor,
                            l1_weight: float, tv_weight: float, std: torch.Tensor | None = None) -> torch.Tensor:
    """∂(Σ_i loss_i)/∂θ given g = ∂D/∂x_adv: (Σ_c g_c/std_c·(x_c − δ_c) + γ + β·∂TV/∂m) · 2m(1 − m)."""
    mask = mask_from_theta(theta.float())
    g = grad_xadv.float()
    if std is not None:
        g = g / std.view(1, -1, 1, 1).float()
    data = g * (x.float() - delta.float())
    if theta.shape[1] == 1:
        data = data.sum(1, keepdim=True)
    grad_mask = data + l1_weight + tv_weight * tv_gradient_reference(mask)
    return grad_mask * 2 * mask * (1 - mask)


def mask_step_reference(theta: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, x: torch.Tensor,
                        delta: torch.Tensor, grad_xadv: torch.Tensor, seeds: torch.Tensor, params: MaskStepParams,
                        mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                        out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused step, in place on ``theta``, ``exp_avg``, ``exp_avg_sq`` (all fp32, (N, M, H, W)).

    Returns ``(delta_next (N, C, 1, 1), x_adv_next (N, C, H, W))`` with δ drawn for step ``params.step + 1``;
    ``x_adv_next`` has ``out_dtype`` (default: x's dtype).
    """
    grad = mask_gradient_reference(theta, x, delta, grad_xadv, params.l1_weight, params.tv_weight, std)
    exp_avg.mul_(params.beta1).add_(grad, alpha=1 - params.beta1)
    exp_avg_sq.mul_(params.beta2).addcmul_(grad, grad, value=1 - params.beta2)
    denom = (exp_avg_sq.sqrt() / params.bias_correction2_sqrt).add_(params.eps)
    theta.addcdiv_(exp_avg, denom, value=-params.step_size)
    delta_next = uniform_noise(seeds, params.step + 1, x.shape[1]).to(x.device)
    x_adv = blend_reference(x.float(), mask_from_theta(theta), delta_next, mean, std)
    return delta_next, x_adv.to(out_dtype or x.dtype)


# ---------------------------------------------------------------- dispatch
# Automatic choice tries Triton first: its step outruns the CUDA one on the GPUs measured (benchmarks/RESULTS.md).
BACKEND_PRIORITY = ("triton", "cuda", "cpp", "reference")
mask_step_op = define_op("mask_step", mask_step_reference, priority=BACKEND_PRIORITY)


def mask_step(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean=None, std=None,
              out_dtype=None, *, backend: str | None = None):
    """One fused mask-optimisation step on the chosen backend; see :func:`mask_step_reference`."""
    if (mean is None) != (std is None):
        raise ValueError("mean, std: expected both or neither (the normalisation folded into the step)")
    if theta.shape[-2:] != x.shape[-2:] or theta.shape[-1] * theta.shape[-2] == 0:
        raise ValueError(f"theta, x: expected equal non-empty (H, W), got {tuple(theta.shape)} and {tuple(x.shape)}")
    return mask_step_op(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean, std, out_dtype,
                        backend=backend)


# ---------------------------------------------------------------- Triton backend
def _mask_step_triton(*args):
    from trojanguard._kernels.mask_step import mask_step_triton

    return mask_step_triton(*args)


def _mask_step_triton_machine_reasons() -> list[str]:
    import importlib.util

    if importlib.util.find_spec("trojanguard._kernels.mask_step") is None:
        return ["trojanguard._kernels.mask_step is not installed"]
    return []


def _mask_step_triton_reasons(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, *rest) -> list[str]:
    return _mask_step_triton_machine_reasons() or triton_reasons(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv)


# ---------------------------------------------------------------- C++ CPU and CUDA backends (trojanguard._C)
def _native_input_reasons(device_type: str, theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params=None,
                          mean=None, std=None, out_dtype=None) -> list[str]:
    """What about these inputs the native kernels cannot take (shapes the reference would reject included)."""
    tensors = {"theta": theta, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "x": x, "delta": delta,
               "grad_xadv": grad_xadv, "seeds": seeds, "mean": mean, "std": std}
    given = {name: t for name, t in tensors.items() if t is not None}
    if not all(isinstance(t, torch.Tensor) for t in given.values()):
        return ["inputs must be tensors"]
    reasons = []
    off_device = [name for name, t in given.items() if t.device.type != device_type]
    if off_device:
        reasons.append(f"tensors are not on {device_type.upper()} ({', '.join(off_device)})")
    elif device_type == "cuda" and len({t.device for t in given.values()}) > 1:
        reasons.append("tensors are on different CUDA devices")
    wrong = [f"{n} is {t.dtype}" for n, t in (("theta", theta), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))
             if t.dtype != torch.float32]
    if wrong:
        reasons.append(f"theta and the Adam moments must be float32 ({', '.join(wrong)})")
    for name, dtype in (("x", x.dtype), ("grad_xadv", grad_xadv.dtype), ("out_dtype", out_dtype or x.dtype)):
        if dtype not in _native.DTYPE_CODES:
            reasons.append(f"{name} must be float32, bfloat16 or float16, got {dtype}")
    if seeds.dtype.is_complex or seeds.dtype == torch.bool:
        reasons.append(f"seeds must be integers, got {seeds.dtype}")
    if x.dim() != 4 or theta.dim() != 4:
        return [*reasons, f"x and theta must be 4-d (N, C, H, W), got {tuple(x.shape)} and {tuple(theta.shape)}"]
    n, c, h, w = x.shape
    if theta.shape[1] not in (1, c) or (theta.shape[0], *theta.shape[2:]) != (n, h, w):
        reasons.append(f"theta must be (N, 1 or C, H, W) for x {tuple(x.shape)}, got {tuple(theta.shape)}")
    if exp_avg.shape != theta.shape or exp_avg_sq.shape != theta.shape:
        reasons.append("exp_avg and exp_avg_sq must have theta's shape")
    if grad_xadv.shape != x.shape:
        reasons.append(f"grad_xadv must have x's shape {tuple(x.shape)}, got {tuple(grad_xadv.shape)}")
    if delta.numel() != n * c or seeds.numel() != n:
        reasons.append(f"delta must hold N·C = {n * c} values and seeds N = {n}")
    if any(t is not None and t.numel() != c for t in (mean, std)):
        reasons.append(f"mean and std must hold C = {c} values")
    if mean is not None and std is None:
        reasons.append("mean is given without std")
    if x.numel() == 0:
        reasons.append("x is empty")
    return reasons


def mask_step_cpp_reasons(*args, **kwargs) -> list[str]:
    """Why the C++ kernel cannot run these :func:`mask_step` arguments (empty: it can)."""
    return _native.cpu_reasons() + _native_input_reasons("cpu", *args, **kwargs)


def mask_step_cuda_reasons(*args, **kwargs) -> list[str]:
    """Why the CUDA kernel cannot run these :func:`mask_step` arguments (empty: it can)."""
    reasons = _native.cuda_reasons() + _native_input_reasons("cuda", *args, **kwargs)
    module = _native.extension().module
    x = args[3] if len(args) > 3 else kwargs.get("x")
    limits = module is not None and hasattr(module, "CUDA_MAX_WIDTH") and isinstance(x, torch.Tensor) and x.dim() == 4
    if limits and (x.shape[-1] > module.CUDA_MAX_WIDTH or x.shape[1] > module.CUDA_MAX_CHANNELS):
        reasons.append(f"the CUDA kernel takes width <= {module.CUDA_MAX_WIDTH} and channels <= "
                       f"{module.CUDA_MAX_CHANNELS}, got {x.shape[-1]} and {x.shape[1]}")
    return reasons


def mask_step_cpp(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean=None, std=None,
                  out_dtype=None):
    """:func:`mask_step_reference` on the C++ CPU kernel (same arguments and results)."""
    return _call_custom_op(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean, std, out_dtype)


def mask_step_cuda(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean=None, std=None,
                   out_dtype=None):
    """:func:`mask_step_reference` on the CUDA kernel (same arguments and results)."""
    return _call_custom_op(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean, std, out_dtype)


def _call_custom_op(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean, std, out_dtype):
    return torch.ops.trojanguard.mask_step(
        theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std, float(params.lr), float(params.beta1),
        float(params.beta2), float(params.eps), float(params.l1_weight), float(params.tv_weight), int(params.step),
        out_dtype or x.dtype)


@torch.library.custom_op("trojanguard::mask_step", mutates_args=("theta", "exp_avg", "exp_avg_sq"),
                         device_types="cpu")
def _mask_step_custom_op(theta: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, x: torch.Tensor,
                         delta: torch.Tensor, grad_xadv: torch.Tensor, seeds: torch.Tensor, mean: torch.Tensor | None,
                         std: torch.Tensor | None, lr: float, beta1: float, beta2: float, eps: float,
                         l1_weight: float, tv_weight: float, step: int,
                         out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused mask step (see :func:`mask_step_reference`): updates θ and the Adam moments in place,
    returns (delta_next (N, C, 1, 1) float32, x_adv_next (N, C, H, W) out_dtype)."""
    return _run_native_kernel("cpu", theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std, lr, beta1,
                              beta2, eps, l1_weight, tv_weight, step, out_dtype)


@_mask_step_custom_op.register_kernel("cuda")
def _mask_step_custom_op_cuda(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std, lr, beta1, beta2,
                              eps, l1_weight, tv_weight, step, out_dtype):
    return _run_native_kernel("cuda", theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std, lr, beta1,
                              beta2, eps, l1_weight, tv_weight, step, out_dtype)


@_mask_step_custom_op.register_fake
def _mask_step_custom_op_fake(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std, lr, beta1, beta2,
                              eps, l1_weight, tv_weight, step, out_dtype):
    n, c = x.shape[:2]
    return x.new_empty((n, c, 1, 1), dtype=torch.float32), torch.empty_like(
        x, dtype=out_dtype, memory_format=torch.contiguous_format)


def _run_native_kernel(device_type, theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std, lr, beta1,
                       beta2, eps, l1_weight, tv_weight, step, out_dtype):
    """Validate, make contiguous copies, allocate the outputs, launch, and copy the state back if it was copied."""
    reasons = (mask_step_cpp_reasons if device_type == "cpu" else mask_step_cuda_reasons)(
        theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, None, mean, std, out_dtype)
    if reasons:
        raise RuntimeError(f"trojanguard::mask_step ({device_type}): " + "; ".join(reasons))
    params = MaskStepParams(lr, beta1, beta2, eps, l1_weight, tv_weight, step)
    n, c, h, w = x.shape
    state = (theta, exp_avg, exp_avg_sq)
    work = [t if t.is_contiguous() else t.contiguous() for t in state]
    x_c, grad_c = x.contiguous(), grad_xadv.contiguous()
    delta_c = delta.reshape(n, c).to(torch.float32).contiguous()
    seeds_c = seeds.reshape(n).to(torch.int64).contiguous()
    mean_c = None if mean is None else mean.reshape(c).to(torch.float32).contiguous()
    std_c = None if std is None else std.reshape(c).to(torch.float32).contiguous()
    delta_next = torch.empty((n, c, 1, 1), dtype=torch.float32, device=x.device)
    x_adv = torch.empty((n, c, h, w), dtype=out_dtype, device=x.device)
    codes = _native.DTYPE_CODES
    args = {
        "theta": work[0].data_ptr(), "exp_avg": work[1].data_ptr(), "exp_avg_sq": work[2].data_ptr(),
        "x": x_c.data_ptr(), "delta": delta_c.data_ptr(), "grad": grad_c.data_ptr(), "seeds": seeds_c.data_ptr(),
        "mean": 0 if mean_c is None else mean_c.data_ptr(), "std": 0 if std_c is None else std_c.data_ptr(),
        "delta_next": delta_next.data_ptr(), "out": x_adv.data_ptr(),
        "x_dtype": codes[x.dtype], "grad_dtype": codes[grad_xadv.dtype], "out_dtype": codes[out_dtype],
        "batch": n, "channels": c, "mask_channels": theta.shape[1], "height": h, "width": w,
        "beta1": beta1, "beta2": beta2, "eps": eps, "l1_weight": l1_weight, "tv_weight": tv_weight,
        "step_size": params.step_size, "bias_correction2_sqrt": params.bias_correction2_sqrt,
        "next_step": step + 1,
    }
    _native.launch("mask_step", x.device, args)
    for original, updated in zip(state, work, strict=True):
        if updated is not original:
            original.copy_(updated)
    return delta_next, x_adv


mask_step_op.register("triton", _mask_step_triton, _mask_step_triton_reasons, _mask_step_triton_machine_reasons)
mask_step_op.register("cpp", mask_step_cpp, mask_step_cpp_reasons)
mask_step_op.register("cuda", mask_step_cuda, mask_step_cuda_reasons)
