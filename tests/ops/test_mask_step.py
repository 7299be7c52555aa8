"""mask_step: every available backend against the pure-PyTorch reference; the reference against autograd.

Tolerances: fp32 state (θ, Adam moments) and fp32 x_adv: atol 2e-5, rtol 1e-5 (one step of fp32 elementwise
math with tanh/sqrt, which may differ in the last ulps between libm, Triton and CUDA). Low-precision x_adv
(bf16/fp16): within twice the reference's own rounding error of that dtype against fp32. δ: bit-identical.
"""

import pytest
import torch
from helpers import FP32_TOLERANCE, MASK_STEP_PARAMS, mask_step_inputs

from trojanguard.ops import (
    BACKEND_NAMES,
    OPS,
    BackendUnavailableError,
    backend_availability,
    blend_reference,
    mask_from_theta,
    mask_gradient_reference,
    mask_step,
    op_backend_availability,
    regularizer_reference,
    uniform_noise,
    use_backend,
)
from trojanguard.ops._backends import Op

PARAMS = MASK_STEP_PARAMS
SHAPES = [  # (N, C, M, H, W): odd sizes, N = 1, C = 1 and 3, per-channel masks
    (1, 1, 1, 7, 9),
    (3, 3, 1, 33, 31),
    (2, 3, 3, 17, 5),
    (4, 3, 1, 32, 32),
]
FAST_BACKENDS = [pytest.param(b, marks=pytest.mark.gpu) if b == "cuda" else b
                 for b in BACKEND_NAMES if b != "reference"]


def make_inputs(n, c, m, h, w, device="cpu", grad_dtype=torch.float32, normalise=True, seed=0):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU backends are tested only where one is present")
    return mask_step_inputs(n, c, m, h, w, seed=seed, grad_dtype=grad_dtype, normalise=normalise, device=device)


def run(backend, tensors, mean, std, out_dtype=None):
    state = [t.clone() for t in tensors]
    delta_next, x_adv = mask_step(*state, PARAMS, mean, std, out_dtype, backend=backend)
    return state[:3], delta_next, x_adv


def _skip_unless_available(backend, tensors, mean, std, out_dtype=None):
    reasons = OPS["mask_step"].reasons(*tensors, PARAMS, mean, std, out_dtype)[backend]
    if reasons:
        pytest.skip(f"{backend} unavailable: {'; '.join(reasons)}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("normalise", [True, False])
def test_backend_matches_reference_fp32(backend, shape, normalise):
    device = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
    tensors, mean, std = make_inputs(*shape, device=device, normalise=normalise)
    _skip_unless_available(backend, tensors, mean, std)
    ref_state, ref_delta, ref_x = run("reference", tensors, mean, std)
    state, delta, x_adv = run(backend, tensors, mean, std)
    for name, a, b in zip(("theta", "exp_avg", "exp_avg_sq"), state, ref_state, strict=True):
        torch.testing.assert_close(a, b, **FP32_TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(delta, ref_delta)
    torch.testing.assert_close(x_adv, ref_x, **FP32_TOLERANCE)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_low_precision_gradient_and_output(backend, dtype):
    device = "cuda" if torch.cuda.is_available() and backend != "cpp" else "cpu"
    tensors, mean, std = make_inputs(3, 3, 1, 19, 23, device=device, grad_dtype=dtype)
    _skip_unless_available(backend, tensors, mean, std, dtype)
    ref_state, _, ref_x32 = run("reference", tensors, mean, std, torch.float32)
    _, _, ref_x_low = run("reference", tensors, mean, std, dtype)
    state, _, x_adv = run(backend, tensors, mean, std, dtype)
    assert x_adv.dtype == dtype
    for a, b in zip(state, ref_state, strict=True):
        torch.testing.assert_close(a, b, **FP32_TOLERANCE)  # fp32 state from the same low-precision grad
    ref_err = (ref_x_low.float() - ref_x32).abs().max()
    assert (x_adv.float() - ref_x32).abs().max() <= 2 * ref_err + 1e-6


def test_reference_mask_gradient_matches_autograd():
    n, c, h, w = 2, 3, 6, 9
    theta = torch.randn(n, 1, h, w, dtype=torch.float64, requires_grad=True)
    x, delta = torch.rand(n, c, h, w, dtype=torch.float64), torch.rand(n, c, 1, 1, dtype=torch.float64)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).double(), torch.tensor([0.2, 0.3, 0.25]).double()
    upstream = torch.randn(n, c, h, w, dtype=torch.float64)
    mask = mask_from_theta(theta)
    l1, tv = regularizer_reference(mask)
    loss = (upstream * blend_reference(x, mask, delta, mean, std)).sum() + 0.01 * l1.sum() + 3.0 * tv.sum()
    loss.backward()
    ours = mask_gradient_reference(theta.detach(), x, delta, upstream, 0.01, 3.0, std)
    torch.testing.assert_close(ours.double(), theta.grad, atol=1e-6, rtol=1e-5)  # ours computes in fp32


def test_reference_step_is_torch_adam():
    tensors, mean, std = make_inputs(2, 3, 1, 8, 8)
    theta, exp_avg, exp_avg_sq, x, delta, grad, seeds = tensors
    param = torch.nn.Parameter(theta.clone())
    opt = torch.optim.Adam([param], lr=PARAMS.lr, betas=(PARAMS.beta1, PARAMS.beta2), eps=PARAMS.eps)
    opt.state[param] = {"step": torch.tensor(float(PARAMS.step - 1)), "exp_avg": exp_avg.clone(),
                        "exp_avg_sq": exp_avg_sq.clone()}
    param.grad = mask_gradient_reference(theta, x, delta, grad, PARAMS.l1_weight, PARAMS.tv_weight, std)
    opt.step()
    state, delta_next, x_adv = run("reference", tensors, mean, std)
    torch.testing.assert_close(state[0], param.detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(delta_next, uniform_noise(seeds, PARAMS.step + 1, 3))
    torch.testing.assert_close(x_adv, blend_reference(x, mask_from_theta(state[0]), delta_next, mean, std))


def test_uniform_noise_is_per_sample_and_uniform():
    seeds = torch.arange(4000)
    u = uniform_noise(seeds, 5, 3)
    assert u.shape == (4000, 3, 1, 1) and u.dtype == torch.float32
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert torch.equal(uniform_noise(seeds[[7, 3]], 5, 3), u[[7, 3]])  # independent of batch composition
    assert not torch.equal(uniform_noise(seeds, 6, 3), u)
    corr = torch.corrcoef(torch.stack([u[:, 0].flatten(), u[:, 1].flatten(), uniform_noise(seeds, 6, 3)[:, 0].flatten()]))
    assert (corr - torch.eye(3)).abs().max() < 0.06


def test_dispatch_explicit_env_and_context(monkeypatch):
    tensors, _, _ = make_inputs(1, 3, 1, 4, 4)
    op = OPS["mask_step"]
    assert op.select("reference", *tensors, PARAMS).backend == "reference"
    assert op.select(None, *tensors, PARAMS).backend in BACKEND_NAMES  # auto never fails
    with pytest.raises(BackendUnavailableError, match="cuda"):  # CPU tensors: refused on a GPU machine too
        op.select("cuda", *tensors, PARAMS)
    with pytest.raises(ValueError, match="expected 'auto' or one of"):
        op.select("fortran", *tensors, PARAMS)
    with use_backend("reference"):
        assert op.select(None, *tensors, PARAMS).backend == "reference"
    monkeypatch.setenv("TROJANGUARD_BACKEND", "reference")
    assert op.select(None, *tensors, PARAMS).backend == "reference"
    torch.use_deterministic_algorithms(True)
    try:
        assert op.select("auto", *tensors, PARAMS).backend == "reference"
    finally:
        torch.use_deterministic_algorithms(False)


def test_op_backend_availability_lists_mask_step_with_every_backend_and_reasons():
    table = op_backend_availability()
    assert set(table) == set(OPS)
    backends = table["mask_step"]
    assert set(backends) == set(BACKEND_NAMES)
    assert backends["reference"] == []
    for name, reasons in backends.items():  # unavailable = a non-empty list of readable reasons
        assert all(isinstance(r, str) and r for r in reasons), (name, reasons)
        assert reasons[: len(backend_availability()[name])] == backend_availability()[name]  # the backend's own first


def test_each_op_declares_its_backend_priority():
    assert OPS["mask_step"].priority[-1] == "reference"
    always = lambda *a, **k: []
    op = Op("toy", lambda x: ("reference", x), priority=("cpp", "reference"))
    op.register("cpp", lambda x: ("cpp", x), always)
    assert op(1) == ("cpp", 1) and op(1, backend="reference") == ("reference", 1)
    assert op.availability()["triton"] == ["not implemented for this op"]
    with pytest.raises(ValueError, match="priority"):
        op.register("triton", lambda x: x, always)
    with pytest.raises(ValueError, match="ending in 'reference'"):
        Op("toy", lambda x: x, priority=("reference", "cpp"))

