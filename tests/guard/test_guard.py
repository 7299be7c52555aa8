"""The guard: the feature-space detector (robust fit, one forward pass), the Guard module, its ONNX graph and
the ONNX Runtime session — parity with PyTorch, metadata, dynamic batch, calibration, bad inputs, policies.

Zoo numbers these tests stand on (digits small CNN, BadNets, robust fit on the poisoned training set without
labels, scoring that same set — the "screen a dataset" use): AUROC 1.000 robust vs 0.948 plain; clean test
vs triggered test 1.000 vs 0.946. The bars below leave room under the measurements.
"""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import held_out_clean_and_triggered

import trojanguard
from trojanguard.detect import CognitiveDistillation, FeatureMahalanobis
from trojanguard.detect.feature_mahalanobis import plain_tied_fit, robust_tied_fit
from trojanguard.errors import DataError
from trojanguard.guard import Guard, GuardSession, export_onnx, read_metadata
from trojanguard.metrics import auroc
from trojanguard.models import build_model

CALIBRATION = 180  # clean test images used to calibrate; the rest (179) are held out
FPR = 0.05
PARITY_RTOL = 1e-4  # the bar: ONNX Runtime vs PyTorch, relative


@pytest.fixture(scope="module")
def entry():
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    return get_backdoored_model(ZooConfig(attack="badnets"), show_progress=False)


@pytest.fixture(scope="module")
def detector(entry):
    return FeatureMahalanobis(entry.model, show_progress=False).fit(entry.train.dataset.x)


@pytest.fixture(scope="module")
def guard(entry, detector):
    guard = Guard(entry.model, detector)
    guard.calibrate(entry.test.x[:CALIBRATION], fpr=FPR)
    return guard


@pytest.fixture(scope="module")
def onnx_path(guard, entry, tmp_path_factory):
    return export_onnx(guard, tmp_path_factory.mktemp("guard") / "guard.onnx", entry.test.x[:2])


@pytest.fixture(scope="module")
def session(onnx_path):
    return GuardSession(onnx_path, providers="cpu")


@pytest.fixture(scope="module")
def parity_inputs(entry):
    """256 inputs: 128 held-out clean test images and 128 triggered test images (true class ≠ target)."""
    return held_out_clean_and_triggered(entry, start=CALIBRATION)


# ------------------------------------------------------------------------------------------ detector on the zoo
@pytest.mark.slow
def test_screening_poisoned_set_robust_fit_beats_plain(entry, detector):
    """Fitted on the poisoned training set itself (no labels), scoring that set. Measured AUROC: robust 1.000,
    plain 0.948 (the poison is half of the target class: the plain fit's mean and covariance absorb it)."""
    poisoned, x = entry.train.is_poisoned, entry.train.dataset.x
    assert auroc(poisoned, detector.score(x)) >= 0.99  # the default: robust, with the typicality prefilter
    # the class fit alone (no prefilter, which would hide the difference: it keeps the poison out of both fits)
    robust = auroc(poisoned, FeatureMahalanobis(entry.model, typical_layer=None, show_progress=False).fit(x).score(x))
    plain = auroc(poisoned, FeatureMahalanobis(entry.model, robust=False, typical_layer=None, show_progress=False
                                               ).fit(x).score(x))
    assert robust >= 0.99
    assert robust > plain + 0.02
    # the reference samples the robust fit left out of its final estimate include every poisoned one
    assert not detector.support[poisoned].any()


@pytest.mark.slow
def test_triggered_inputs_score_above_clean(entry, detector, parity_inputs):
    x, triggered = parity_inputs
    assert auroc(triggered, detector.score(x)) >= 0.99  # measured 1.000


# ------------------------------------------------------------------------------------------ ONNX parity and graph
@pytest.mark.slow
def _assert_parity(guard, session, x):
    """ONNX Runtime vs PyTorch on ``x``: logits within PARITY_RTOL of each row's largest logit magnitude, scores
    within PARITY_RTOL relative, flags identical. Returns the session's flags."""
    logits, score, flagged = guard.run(x)
    ort_logits, ort_score, ort_flagged = session.run(x)
    scale = logits.abs().amax(1, keepdim=True).numpy()
    assert np.all(np.abs(ort_logits - logits.numpy()) <= PARITY_RTOL * scale)
    np.testing.assert_allclose(ort_score, score.numpy(), rtol=PARITY_RTOL, atol=0)
    np.testing.assert_array_equal(ort_flagged, flagged.numpy())
    return ort_flagged


def test_onnx_runtime_matches_pytorch_on_clean_and_triggered(guard, session, parity_inputs):
    """256 inputs: logits within 1e-4 of each row's largest logit magnitude, scores within 1e-4 relative, flags
    identical (measured: 7e-7 and 1e-6)."""
    x, triggered = parity_inputs
    ort_flagged = _assert_parity(guard, session, x)
    assert ort_flagged[triggered.numpy()].all()  # every triggered input flagged…
    assert ort_flagged[~triggered.numpy()].mean() <= 0.15  # …and few clean ones (fpr 0.05)


HAS_ORT_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_ORT_CUDA, reason="ONNX Runtime's CUDA provider is not installed here (onnxruntime-gpu "
                                             "and a GPU are needed)")
def test_cuda_provider_matches_pytorch(guard, onnx_path, parity_inputs):
    """``providers="auto"`` picks CUDA where onnxruntime-gpu runs; same parity bars as on the CPU."""
    cuda = GuardSession(onnx_path, providers="auto")
    assert cuda.providers[0] == "CUDAExecutionProvider"
    _assert_parity(guard, cuda, parity_inputs[0])


def test_provider_choice_prefers_cuda_and_names_what_is_missing(monkeypatch):
    from trojanguard.guard import resolve_providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert resolve_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("cuda") == ["CUDAExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert resolve_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match=r"CUDAExecutionProvider.*not available.*CPUExecutionProvider.*onnxruntime-gpu"):
        resolve_providers("cuda")


@pytest.mark.slow
def test_graph_passes_checker_and_records_metadata(onnx_path, guard, session):
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["logits", "score", "flagged"]
    meta = read_metadata(onnx_path)
    assert meta["threshold"] == guard.threshold
    assert meta["input_shape"] == [3, 32, 32]
    assert meta["input_range"] == [0.0, 1.0]
    assert meta["version"] == trojanguard.__version__
    assert meta["policy"] == "flag"
    assert meta["normalization"]["in_graph"] is False  # the zoo model has no Normalize layer
    assert meta["exporter"] in ("torchscript", "dynamo")
    assert "FeatureMahalanobis" in meta["detector"]
    assert session.threshold == guard.threshold and session.input_shape == (3, 32, 32)


@pytest.mark.slow
def test_dynamic_batch_runs_batch_1_and_64_from_one_file(session, parity_inputs):
    x = parity_inputs[0][:64].numpy()
    whole = session.run(x)
    assert whole.logits.shape == (64, 10) and whole.score.shape == (64,) and whole.flagged.dtype == np.bool_
    one = session.run(x[:1])
    np.testing.assert_allclose(one.score, whole.score[:1], rtol=1e-5)
    np.testing.assert_allclose(one.logits, whole.logits[:1], rtol=1e-5, atol=1e-5)
    chunked = GuardSession(session.path, providers="cpu", batch_size=7).run(x)
    np.testing.assert_allclose(chunked.score, whole.score, rtol=1e-5)


@pytest.mark.slow
def test_calibration_hits_the_false_positive_rate_on_held_out_clean_data(guard, entry):
    """Threshold from 180 clean images at fpr 0.05; the other 179 clean images are flagged at 0.05 give or take
    3 standard deviations of the difference of two binomial proportions (both sets estimate the same rate)."""
    held_out = entry.test.x[CALIBRATION:]
    rate = float(guard.run(held_out).flagged.float().mean())
    sd = math.sqrt(FPR * (1 - FPR) * (1 / CALIBRATION + 1 / len(held_out)))
    assert abs(rate - FPR) <= 3 * sd, rate
    assert float(guard.run(entry.test.x[:CALIBRATION]).flagged.float().mean()) <= FPR  # by construction


# ------------------------------------------------------------------------------------------ bad inputs at serving
@pytest.mark.slow
def test_session_rejects_wrong_shape_dtype_and_empty_batches(session, parity_inputs):
    x = parity_inputs[0][:4].numpy()
    with pytest.raises(DataError, match="float32.*float64"):
        session.run(x.astype(np.float64))
    with pytest.raises(DataError, match=r"uint8.*255"):
        session.run((x * 255).astype(np.uint8))
    with pytest.raises(DataError, match=r"\(N, 3, 32, 32\).*\(4, 1, 32, 32\)"):
        session.run(x[:, :1])
    with pytest.raises(DataError, match=r"x\[None\]"):
        session.run(x[0])
    with pytest.raises(DataError, match="empty"):
        session.run(x[:0])
    with pytest.raises(DataError, match="NumPy, torch or nested lists"):
        session.run("x")


@pytest.mark.slow
def test_non_finite_and_out_of_range_inputs_are_flagged_not_answered(guard, session, onnx_path, parity_inputs):
    """NaN, ±Inf, > 1 and < 0 values: score = inf and flagged, in PyTorch, in the session and in the raw graph
    (a server that skips GuardSession); the valid rows of the same batch are unaffected."""
    x = parity_inputs[0][:6].clone()
    x[0, 0, 0, 0], x[1, 1, 5, 5], x[2, 2, 31, 31] = math.nan, math.inf, -math.inf
    x[3, 0, 3, 3], x[4, 0, 3, 3] = 1.0001, -0.01
    clean = session.run(parity_inputs[0][:6])
    raw = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for logits, score, flagged in (guard.run(x), session.run(x), raw.run(None, {"input": x.numpy()})):
        score, flagged = np.asarray(score), np.asarray(flagged)
        assert flagged[:5].all() and np.isinf(score[:5]).all()
        np.testing.assert_allclose(score[5], clean.score[5], rtol=PARITY_RTOL)
        assert flagged[5] == clean.flagged[5]


# ------------------------------------------------------------------------------------------ policies and API
@pytest.mark.slow
def test_reject_policy_withholds_logits_of_flagged_inputs(entry, detector, guard, parity_inputs, tmp_path):
    rejecting = Guard(entry.model, detector, threshold=guard.threshold, policy="reject")
    x = parity_inputs[0]
    logits, _, flagged = rejecting.run(x)
    reference = guard.run(x)
    assert torch.equal(flagged, reference.flagged) and flagged.any() and (~flagged).any()
    assert torch.isnan(logits[flagged]).all()
    assert torch.equal(logits[~flagged], reference.logits[~flagged])
    path = export_onnx(rejecting, tmp_path / "reject.onnx", x[:2])
    out = GuardSession(path, providers="cpu").run(x)
    assert read_metadata(path)["policy"] == "reject"
    np.testing.assert_array_equal(out.flagged, flagged.numpy())
    assert np.isnan(out.logits[out.flagged]).all() and np.isfinite(out.logits[~out.flagged]).all()


@pytest.mark.slow
def test_guard_arguments_are_checked(entry, detector, guard, tmp_path):
    with pytest.raises(TypeError, match="as_module"):
        Guard(entry.model, CognitiveDistillation(entry.model))
    with pytest.raises(ValueError, match="policy"):
        Guard(entry.model, detector, policy="drop")
    other = build_model("small_cnn", num_classes=10)
    with pytest.raises(ValueError, match="differs from the model the detector was fitted on"):
        Guard(other, detector)
    uncalibrated = Guard(entry.model, FeatureMahalanobis(entry.model, show_progress=False).fit(entry.test.x[:64]))
    with pytest.raises(RuntimeError, match="calibrate"):
        uncalibrated(entry.test.x[:2])
    with pytest.raises(RuntimeError, match="calibrate"):
        export_onnx(uncalibrated, tmp_path / "g.onnx", entry.test.x[:2])
    with pytest.raises(DataError, match=r"\(3, 32, 32\)"):
        export_onnx(guard, tmp_path / "g.onnx", torch.rand(2, 3, 16, 16))
    with pytest.raises(DataError, match="path"):
        GuardSession(_plain_onnx(entry.model, tmp_path / "bare.onnx"), providers="cpu")


@pytest.mark.slow
def test_detector_and_guard_leave_the_model_untouched(entry, detector, guard):
    model = entry.model
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    Guard(model, detector, threshold=1.0).run(entry.test.x[:4])
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    model.eval()
    assert not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in guard.parameters())
    torch.testing.assert_close(detector.score(entry.test.x[:16]), guard.run(entry.test.x[:16]).score)


# ------------------------------------------------------------------------------------------ fit, fast and synthetic
def _contaminated_classes(seed=0):
    """Two classes in 8-D; 40 % of class 0 is a shifted cluster (the poison)."""
    g = torch.Generator().manual_seed(seed)
    clean0 = torch.randn(120, 8, generator=g, dtype=torch.float64)
    poison = torch.randn(80, 8, generator=g, dtype=torch.float64) * 1.5 + torch.tensor([8.0] + [0.0] * 7)
    clean1 = torch.randn(200, 8, generator=g, dtype=torch.float64) + torch.tensor([0.0, 10.0] + [0.0] * 6)
    features = torch.cat([clean0, poison, clean1])
    classes = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    is_poison = torch.zeros(400, dtype=torch.bool)
    is_poison[120:200] = True
    return features, classes, is_poison


def test_robust_fit_keeps_the_class_mean_on_the_clean_majority():
    features, classes, is_poison = _contaminated_classes()
    means, covariance, support = robust_tied_fit(features, classes, 2)
    plain_means, plain_covariance, _ = plain_tied_fit(features, classes, 2)
    assert means[0].norm() < 0.5  # the robust mean stays on the clean majority…
    assert plain_means[0].norm() > 3.0  # …the plain one moves 40 % of the way to the poison
    assert not support[is_poison].any() and support[~is_poison].float().mean() > 0.9
    assert covariance[0, 0] < 2.0 < plain_covariance[0, 0]  # the poison direction is not inflated


@pytest.fixture(scope="module")
def tiny():
    """An untrained 3-class CNN on random 1×16×16 images, with labels that leave class 2 empty."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=3, in_channels=1).eval()
    x = torch.rand(80, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(80) % 2
    return model, x, labels


@pytest.mark.parametrize("rule", ["predicted", "nearest"])
def test_exported_scores_match_for_both_rules_and_absent_classes(tiny, rule, tmp_path):
    model, x, labels = tiny
    detector = FeatureMahalanobis(model, rule=rule, layer="features.1", show_progress=False).fit(x, labels=labels)
    assert detector.present.tolist() == [True, True, False]
    guard = Guard(model, detector, threshold=1.0)
    path = export_onnx(guard, tmp_path / "tiny.onnx", x[:2], opset=17)
    out = GuardSession(path, providers="cpu").run(x)
    reference = guard.run(x)
    np.testing.assert_allclose(out.score, reference.score.numpy(), rtol=PARITY_RTOL)
    assert np.isfinite(out.score).all()
    torch.testing.assert_close(detector.score(x), reference.score)


def test_fit_and_session_argument_errors(tiny, tmp_path):
    model, x, labels = tiny
    with pytest.raises(ValueError, match="rule"):
        FeatureMahalanobis(model, rule="closest")
    with pytest.raises(ValueError, match="support_fraction"):
        FeatureMahalanobis(model, support_fraction=0.3)
    with pytest.raises(ValueError, match="no module named"):
        FeatureMahalanobis(model, layer="nope")
    with pytest.raises(DataError, match="labels"):
        FeatureMahalanobis(model, show_progress=False).fit(x, labels=labels[:10])
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        FeatureMahalanobis(model, show_progress=False).fit(x * 2)
    with pytest.raises(RuntimeError, match="fit"):
        FeatureMahalanobis(model).score(x)
    with pytest.raises(FileNotFoundError):
        GuardSession(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="not available"):
        GuardSession(_plain_onnx(model, tmp_path / "m.onnx", x[:1]), providers=["NoSuchExecutionProvider"])


def _plain_onnx(model, path, example=None):
    import warnings

    example = torch.rand(1, 3, 32, 32) if example is None else example
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["logits"])
    return path


def test_serving_graph_stays_slim(tiny, tmp_path):
    """The batch-1 overhead is ONNX Runtime's fixed cost per node (~1 µs each; benchmarks/RESULTS.md): the guard
    adds at most 17 nodes to the model's (input check 6, finite-logits check 3, detector 6, flag 2) and none of the slow ones — ReduceL1
    (unvectorised in ORT), ReduceMean on the feature map (forces a reorder of the whole map out of NCHWc)."""
    import onnx

    model, x, _ = tiny
    detector = FeatureMahalanobis(model, show_progress=False).fit(x, labels=torch.arange(len(x)) % 3)
    guard = Guard(model, detector, threshold=1.0)
    ops = [n.op_type for n in onnx.load(str(export_onnx(guard, tmp_path / "g.onnx", x[:2]))).graph.node
           if n.op_type != "Constant"]
    bare = [n.op_type for n in onnx.load(str(_plain_onnx(model, tmp_path / "bare.onnx", x[:2]))).graph.node
            if n.op_type != "Constant"]
    assert len(ops) - len(bare) <= 17, ops
    assert not {"ReduceL1", "ReduceMean", "MatMul", "Cast"} & set(ops), ops
    reference = guard.run(x)
    out = GuardSession(tmp_path / "g.onnx", providers="cpu").run(x)
    np.testing.assert_allclose(out.score, reference.score.numpy(), rtol=PARITY_RTOL)
