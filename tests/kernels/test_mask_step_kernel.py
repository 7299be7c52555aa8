"""Triton mask_step kernel against the reference where the generic backend tests do not reach: many tiles per
plane (the halo copy that keeps the TV stencil on pre-step θ), tiles narrower than a row, non-contiguous and
non-fp32 inputs, RNG edge cases.

Tolerances from helpers.py, as in tests/ops/test_mask_step.py: fp32 state and x_adv atol 2e-5, rtol 1e-5; δ bit-identical.
"""

import dataclasses
import os

import pytest
import torch

from trojanguard.ops import MaskStepParams, mask_step_reference, uniform_noise

triton = pytest.importorskip("triton", reason="triton is not installed")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

from helpers import FP32_TOLERANCE, MASK_STEP_PARAMS, mask_step_inputs
from trojanguard._kernels.mask_step import mask_step_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PARAMS = MASK_STEP_PARAMS


def make_inputs(n, c, m, h, w, seed=0, normalise=True, step=PARAMS.step):
    return mask_step_inputs(n, c, m, h, w, seed=seed, normalise=normalise, step=step, device=DEVICE)


def assert_matches_reference(tensors, mean, std, params=PARAMS, out_dtype=None, **kwargs):
    ref = [t.clone() for t in tensors]
    ref_delta, ref_x = mask_step_reference(*ref, params, mean, std, out_dtype)
    ours = [t.clone() for t in tensors]
    delta, x_adv = mask_step_triton(*ours, params, mean, std, out_dtype, **kwargs)
    for name, a, b in zip(("theta", "exp_avg", "exp_avg_sq"), ours[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, **FP32_TOLERANCE, msg=lambda msg, n=name: f"{n}: {msg}")
    assert delta.shape == ref_delta.shape and delta.dtype == torch.float32
    assert torch.equal(delta, ref_delta)
    assert x_adv.dtype == ref_x.dtype
    torch.testing.assert_close(x_adv, ref_x, **FP32_TOLERANCE)
    return ours


@pytest.mark.parametrize(("shape", "block_size"), [
    ((2, 3, 1, 24, 20), 64),  # tiles of ~3 rows, starting mid-row
    ((1, 3, 3, 9, 50), 32),  # tiles narrower than a row: halo spans several tiles
    ((2, 1, 1, 31, 1), 8),  # one column: only up/down neighbours
    ((1, 2, 1, 1, 37), 16),  # one row: only left/right neighbours
])
def test_many_tiles_per_plane(shape, block_size):
    tensors, mean, std = make_inputs(*shape)
    assert_matches_reference(tensors, mean, std, block_size=block_size)


def test_other_adam_settings_and_no_normalisation():
    params = MaskStepParams(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, l1_weight=0.1, tv_weight=3.0, step=1)
    tensors, mean, std = make_inputs(2, 3, 1, 10, 14, normalise=False, step=params.step)
    assert_matches_reference(tensors, mean, std, params=params, block_size=32)


def test_larger_plane_automatic_tiles():
    tensors, mean, std = make_inputs(1, 3, 1, 64, 64)  # 4 tiles of 1024 pixels with the default choice
    assert_matches_reference(tensors, mean, std)


def test_non_contiguous_inputs_update_caller_tensors():
    tensors, mean, std = make_inputs(2, 3, 1, 12, 10, normalise=False)
    theta, exp_avg, exp_avg_sq, x, delta, grad, seeds = tensors
    theta_t = theta.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous
    x_cl = x.contiguous(memory_format=torch.channels_last)
    grad_wide = torch.cat([grad, grad], dim=3)[..., ::2]  # strided view, values grad[..., ::2] of the copy
    ours = [theta_t, exp_avg, exp_avg_sq, x_cl, delta, grad_wide, seeds]
    ref = [t.clone() for t in (theta, exp_avg, exp_avg_sq, x, delta, grad_wide.contiguous(), seeds)]
    ref_delta, ref_x = mask_step_reference(*ref, PARAMS, mean, std)
    delta_next, x_adv = mask_step_triton(*ours, PARAMS, mean, std, block_size=32)
    assert not theta_t.is_contiguous()
    torch.testing.assert_close(theta_t, ref[0], **FP32_TOLERANCE)  # written back into the caller's view
    torch.testing.assert_close(exp_avg, ref[1], **FP32_TOLERANCE)
    torch.testing.assert_close(exp_avg_sq, ref[2], **FP32_TOLERANCE)
    assert torch.equal(delta_next, ref_delta)
    torch.testing.assert_close(x_adv, ref_x, **FP32_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x_and_grad(dtype):
    """x and g in low precision; the output keeps x's dtype and is within 2× the reference's rounding."""
    tensors, mean, std = make_inputs(2, 3, 3, 11, 13)
    tensors[3], tensors[5] = tensors[3].to(dtype), tensors[5].to(dtype)
    ref = [t.clone() for t in tensors]
    _, ref_x32 = mask_step_reference(*ref, PARAMS, mean, std, torch.float32)
    ref_err = (ref_x32.to(dtype).float() - ref_x32).abs().max()
    ours = [t.clone() for t in tensors]
    _, x_adv = mask_step_triton(*ours, PARAMS, mean, std, block_size=64)
    assert x_adv.dtype == dtype
    for a, b in zip(ours[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, **FP32_TOLERANCE)
    assert (x_adv.float() - ref_x32).abs().max() <= 2 * ref_err + 1e-6


@pytest.mark.parametrize("step", [1, 2**31 - 2, 2**31, 2**32 + 6])
def test_rng_edge_cases_bit_identical(step):
    """Seeds outside [0, 2³¹) and step counts at the int32/uint32 limits still hash like the reference."""
    tensors, mean, std = make_inputs(4, 3, 1, 5, 6)
    tensors[6] = torch.tensor([0, 2**31 - 1, 2**32 + 5, -1], device=DEVICE)
    params = dataclasses.replace(PARAMS, step=step)
    ours = [t.clone() for t in tensors]
    delta, _ = mask_step_triton(*ours, params, mean, std)
    assert torch.equal(delta, uniform_noise(tensors[6].cpu(), params.step + 1, 3).to(DEVICE))


def test_rejects_mismatched_shapes():
    tensors, mean, std = make_inputs(2, 3, 1, 4, 4)
    bad = list(tensors)
    bad[0] = bad[0][:, :, :3]
    with pytest.raises(ValueError, match="theta"):
        mask_step_triton(*bad, PARAMS, mean, std)
    with pytest.raises(ValueError, match="mean, std"):
        mask_step_triton(*tensors, PARAMS, None, std)
