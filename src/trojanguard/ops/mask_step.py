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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
mask_step_op = define_op("mask_step", mask_step_reference)


def mask_step(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean=None, std=None,
              out_dtype=None, *, backend: str | None = None):
    """One fused mask-optimisation step on the chosen backend; see :func:`mask_step_reference`."""
    if (mean is None) != (std is None):
        raise ValueError("mean, std: expected both or neither (the normalisation folded into the step)")
    if theta.shape[-2:] != x.shape[-2:] or theta.shape[-1] * theta.shape[-2] == 0:
        raise ValueError(f"theta, x: expected equal non-empty (H, W), got {tuple(theta.shape)} and {tuple(x.shape)}")
    return mask_step_op(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean, std, out_dtype,
                        backend=backend)


def _mask_step_triton(*args):
    from trojanguard._kernels.mask_step import mask_step_triton

    return mask_step_triton(*args)


def _mask_step_triton_reasons(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, *rest) -> list[str]:
    import importlib.util

    if importlib.util.find_spec("trojanguard._kernels.mask_step") is None:
        return ["trojanguard._kernels.mask_step is not installed"]
    return triton_reasons(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv)


def _register_native_backends() -> None:
    from trojanguard import _native

    mask_step_op.register("cpp", _native.mask_step_cpp, _native.mask_step_cpp_reasons)
    mask_step_op.register("cuda", _native.mask_step_cuda, _native.mask_step_cuda_reasons)


mask_step_op.register("triton", _mask_step_triton, _mask_step_triton_reasons)
_register_native_backends()
