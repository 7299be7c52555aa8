"""The native extension: build info, reasons, the custom op, the just-in-time build and its failure modes.

Kernel results are compared with mask_step_reference at the tolerances of tests/ops/test_mask_step.py (fp32 state and
x_adv: atol 2e-5, rtol 1e-5; δ bit-identical); that file covers the shapes and dtypes of every backend, this one
the cases specific to the C++ kernel (row tiles with halos, low-precision x, non-contiguous state).
"""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from helpers import FP32_TOLERANCE, MASK_STEP_PARAMS, SRC, low_precision_tolerance, mask_step_inputs

from trojanguard import _native
from trojanguard.ops import OPS, BackendUnavailableError, mask_step
from trojanguard.ops.mask_step import mask_step_cpp_reasons, mask_step_cuda_reasons

PARAMS = MASK_STEP_PARAMS


def make_inputs(n, c, m, h, w, x_dtype=torch.float32, grad_dtype=torch.float32, seed=0):
    return mask_step_inputs(n, c, m, h, w, seed=seed, x_dtype=x_dtype, grad_dtype=grad_dtype, wide_seeds=True)


def run(backend, tensors, mean, std, out_dtype=None):
    state = [t.clone() for t in tensors]
    delta_next, x_adv = mask_step(*state, PARAMS, mean, std, out_dtype, backend=backend)
    return state[:3], delta_next, x_adv


def assert_matches_reference(tensors, mean, std, out_dtype=None):
    ref_state, ref_delta, ref_x = run("reference", tensors, mean, std, out_dtype)
    state, delta, x_adv = run("cpp", tensors, mean, std, out_dtype)
    for a, b in zip(state, ref_state, strict=True):
        torch.testing.assert_close(a, b, **FP32_TOLERANCE)
    assert torch.equal(delta, ref_delta)
    assert x_adv.dtype == ref_x.dtype
    if x_adv.dtype == torch.float32:
        torch.testing.assert_close(x_adv, ref_x, **FP32_TOLERANCE)
    else:  # one rounding of nearly the same fp32 value: at most one ulp of the low-precision dtype apart
        torch.testing.assert_close(x_adv.float(), ref_x.float(), **low_precision_tolerance(x_adv.dtype))


@pytest.fixture
def needs_extension():
    reasons = _native.cpu_reasons()
    if reasons:
        pytest.skip("native extension unavailable: " + "; ".join(reasons))


@pytest.fixture(scope="session")
def jit_cache():
    """The just-in-time build (CPU part) in the session's $TROJANGUARD_CACHE (conftest: a temporary directory);
    builds are keyed by a hash of the sources, so a later session reuses it until csrc/ changes."""
    cache = _native.cache_dir().parent
    try:
        path, cuda_note = _native.jit_build(cache / "ext", with_cuda=False)
    except _native.JITBuildError as error:
        pytest.skip(f"no working C++ toolchain for the just-in-time build: {error}")
    return cache, path, cuda_note


# ---------------------------------------------------------------- build info and reasons
def test_native_is_a_leaf_that_does_not_import_ops():
    """_native loads and launches; each op's glue lives in trojanguard.ops, which imports _native, not back."""
    script = ("import sys, trojanguard._native; "
              "print(sorted(m for m in sys.modules if m == 'trojanguard.ops' or m.startswith('trojanguard.ops.')))")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_build_info_reports_openmp_cuda_and_origin(needs_extension):
    info = _native.build_info()
    assert info["api_version"] == _native.API_VERSION
    assert isinstance(info["openmp"], bool) and isinstance(info["cuda"], bool)
    assert info["origin"]


def test_cuda_reasons_say_why():
    reasons = _native.cuda_reasons()
    if torch.cuda.is_available() and not reasons:
        pytest.skip("the CUDA backend is available here")
    assert reasons and all(isinstance(r, str) and r for r in reasons)
    if not torch.cuda.is_available() and not _native.cpu_reasons():
        assert any("no CUDA device" in r for r in reasons)


def test_mask_step_reasons_reject_dtypes_devices_and_shapes(needs_extension):
    tensors, mean, std = make_inputs(2, 3, 1, 5, 6)
    assert mask_step_cpp_reasons(*tensors, PARAMS, mean, std) == []

    def reasons_with(index, value, *, mean=mean, std=std, out_dtype=None):
        args = list(tensors)
        if index is not None:
            args[index] = value
        return " ".join(mask_step_cpp_reasons(*args, PARAMS, mean, std, out_dtype))

    assert "float32" in reasons_with(0, tensors[0].double())
    assert "x must be float32, bfloat16 or float16" in reasons_with(3, tensors[3].double())
    assert "grad_xadv must be" in reasons_with(5, tensors[5].to(torch.int32))
    assert "out_dtype must be" in reasons_with(None, None, out_dtype=torch.float64)
    assert "theta must be (N, 1 or C, H, W)" in reasons_with(0, torch.zeros(2, 2, 5, 6))
    assert "mean is given without std" in reasons_with(None, None, std=None)
    assert "not on CUDA" in " ".join(mask_step_cuda_reasons(*tensors, PARAMS, mean, std))
    with pytest.raises(BackendUnavailableError, match="float32"):
        mask_step(tensors[0].double(), *tensors[1:], PARAMS, mean, std, backend="cpp")


# ---------------------------------------------------------------- the C++ kernel beyond tests/ops/test_mask_step.py
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(1, 3, 1, 37, 11), (1, 3, 3, 23, 8), (2, 1, 1, 16, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpp_row_tiles_with_halos_match_reference(needs_extension, shape, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # few planes: each is split into row tiles joined by halo rows
    try:
        tensors, mean, std = make_inputs(*shape)
        assert_matches_reference(tensors, mean, std)
        assert_matches_reference(tensors, None, None)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_cpp_low_precision_x(needs_extension, x_dtype, out_dtype):
    tensors, mean, std = make_inputs(3, 3, 1, 9, 13, x_dtype=x_dtype, grad_dtype=x_dtype)
    assert_matches_reference(tensors, mean, std, out_dtype)


def test_cpp_updates_non_contiguous_state_in_place(needs_extension):
    tensors, mean, std = make_inputs(2, 3, 1, 8, 7)
    ref_state, ref_delta, ref_x = run("reference", tensors, mean, std)
    state = [t.clone() for t in tensors]
    theta = state[0].transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
    assert not theta.is_contiguous()
    delta, x_adv = mask_step(theta, *state[1:], PARAMS, mean, std, backend="cpp")
    torch.testing.assert_close(theta, ref_state[0], **FP32_TOLERANCE)
    assert torch.equal(delta, ref_delta)
    torch.testing.assert_close(x_adv, ref_x, **FP32_TOLERANCE)


def test_custom_op_fake_impl_and_opcheck(needs_extension):
    from torch._subclasses.fake_tensor import FakeTensorMode

    tensors, mean, std = make_inputs(2, 3, 1, 6, 5)
    args = (*tensors, mean, std, PARAMS.lr, PARAMS.beta1, PARAMS.beta2, PARAMS.eps, PARAMS.l1_weight,
            PARAMS.tv_weight, PARAMS.step, torch.bfloat16)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        delta_next, x_adv = torch.ops.trojanguard.mask_step(*fake_args)
    assert delta_next.shape == (2, 3, 1, 1) and delta_next.dtype == torch.float32
    assert x_adv.shape == (2, 3, 6, 5) and x_adv.dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.trojanguard.mask_step.default, args)


# ---------------------------------------------------------------- just-in-time build
def test_jit_build_is_cached_and_matches_reference(jit_cache, monkeypatch):
    cache, path, cuda_note = jit_cache
    assert path.is_file() and path.is_relative_to(cache / "ext")
    assert "without CUDA" in cuda_note
    assert _native.jit_build(cache / "ext", with_cuda=False)[0] == path  # second call: the cached build
    module = _native.import_extension(path)
    assert module.build_info()["cuda"] is False and module.build_info()["api_version"] == _native.API_VERSION
    monkeypatch.setattr(_native, "_extension", _native.Extension(module, str(path), cuda_note=cuda_note))
    assert _native.cpu_reasons() == []
    assert any("without CUDA" in r for r in _native.cuda_reasons())
    tensors, mean, std = make_inputs(3, 3, 1, 19, 23, grad_dtype=torch.float16)
    assert_matches_reference(tensors, mean, std)
    assert_matches_reference(tensors, mean, std, torch.float16)


def _reload_without_installed_extension(monkeypatch, env):
    def not_installed():
        raise ImportError("No module named 'trojanguard._C' (hidden by the test)")

    monkeypatch.setattr(_native, "_import_installed", not_installed)
    monkeypatch.setattr(_native, "_extension", None)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_missing_compiler_warns_once_and_falls_back_to_reference(monkeypatch, tmp_path):
    _reload_without_installed_extension(monkeypatch, {"CXX": str(tmp_path / "no-such-c++"),
                                                      "TROJANGUARD_CACHE": str(tmp_path)})
    tensors, mean, std = make_inputs(1, 3, 1, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reasons = _native.cpu_reasons()
        assert _native.cuda_reasons() == reasons
        assert OPS["mask_step"].select(None, *tensors, PARAMS, mean, std).backend == "reference"
        delta, x_adv = mask_step(*[t.clone() for t in tensors], PARAMS, mean, std)
    unavailable = [w for w in caught if "native extension unavailable" in str(w.message)]
    assert len(unavailable) == 1, [str(w.message) for w in caught]
    assert any("no-such-c++" in r and "does not run" in r for r in reasons), reasons
    assert any("trojanguard._C is not installed" in r for r in reasons)
    _, ref_delta, ref_x = run("reference", tensors, mean, std)
    assert torch.equal(delta, ref_delta) and torch.equal(x_adv, ref_x)
    with pytest.raises(BackendUnavailableError, match="no-such-c\\+\\+"):
        mask_step(*tensors, PARAMS, mean, std, backend="cpp")


def test_no_jit_env_opts_out(monkeypatch):
    _reload_without_installed_extension(monkeypatch, {_native.NO_JIT_ENV: "1"})
    with pytest.warns(RuntimeWarning, match="native extension unavailable"):
        reasons = _native.cpu_reasons()
    assert any(_native.NO_JIT_ENV in r for r in reasons)


def test_source_tree_without_installed_extension_builds_just_in_time(jit_cache):
    """As on a machine running from the source tree (PYTHONPATH=src, no built _C): JIT, no warning."""
    cache, path, _ = jit_cache
    script = textwrap.dedent("""
        import sys, warnings
        class HideInstalled:  # as if trojanguard._C had never been built
            def find_spec(self, name, path=None, target=None):
                if name == "trojanguard._C":
                    raise ImportError("hidden by the test")
        sys.meta_path.insert(0, HideInstalled())
        warnings.filterwarnings("error", message="trojanguard")
        import torch
        from trojanguard import _native
        from trojanguard.ops import mask_step, mask_step_reference, MaskStepParams, uniform_noise
        assert _native.cpu_reasons() == [], _native.cpu_reasons()
        print(_native.build_info()["origin"])
        p = MaskStepParams(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, l1_weight=0.01, tv_weight=1.0, step=1)
        g = torch.Generator().manual_seed(0)
        state = [torch.randn(2, 1, 9, 7, generator=g), torch.zeros(2, 1, 9, 7), torch.zeros(2, 1, 9, 7)]
        x, grad, seeds = torch.rand(2, 3, 9, 7, generator=g), torch.randn(2, 3, 9, 7, generator=g), torch.arange(2)
        delta = uniform_noise(seeds, 1, 3)
        ref = [t.clone() for t in state]
        out = mask_step(*state, x, delta, grad, seeds, p, backend="cpp")
        expected = mask_step_reference(*ref, x, delta, grad, seeds, p)
        torch.testing.assert_close(state[0], ref[0], atol=2e-5, rtol=1e-5)
        assert torch.equal(out[0], expected[0])
        torch.testing.assert_close(out[1], expected[1], atol=2e-5, rtol=1e-5)
    """)
    env = {**os.environ, "TROJANGUARD_CACHE": str(cache), "PYTHONPATH": str(SRC), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(path)
