"""Bad input to the detectors, their calibration, ``screen``'s fit and the serving session (issue 13): a fit or a
threshold on too few samples, infinite scores, a screened batch that cannot support a self-fit (``--reference``,
``--detector-file``), and what ``GuardSession.run`` and the web-service example of docs/guard.md do with lists,
ragged arrays, strings, wrong shapes and 0–255 pixels. Tiny data and untrained small models only."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
import warnings

import helpers
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from trojanguard.detect import Detector, FeatureMahalanobis
from trojanguard.detect.base import SampleSizeWarning
from trojanguard.errors import DataError, ModelLoadError
from trojanguard.guard import Guard, GuardSession, export_onnx
from trojanguard.models import build_model, save_model
from trojanguard.screening import DETECTORS, register_detector, screen
from trojanguard.screening.records import ResultsFile
from trojanguard.thresholds import min_calibration_samples

ROOT = helpers.ROOT
SIZE = 16


class Brightness(Detector):
    """Toy detector: mean pixel value; ``holes`` put NaN / inf at given indices of the screened data."""

    def __init__(self, model=None, holes=()):
        self.holes, self.seen = {int(k): v for k, v in dict(holes).items()}, 0

    def score(self, x):
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
        scores = x.flatten(1).mean(1).double()
        for index, value in self.holes.items():
            if self.seen <= index < self.seen + len(x):
                scores[index - self.seen] = float(value)
        self.seen += len(x)
        return scores


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=4).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("detector-input")
    save_model(model, root / "model.safetensors")
    torch.manual_seed(1)
    save_model(build_model("small_cnn", num_classes=4).eval(), root / "other.safetensors")
    generator = torch.Generator().manual_seed(2)
    np.savez(root / "data.npz", x=torch.rand(24, 3, SIZE, SIZE, generator=generator).numpy())
    np.savez(root / "reference.npz", x=torch.rand(40, 3, SIZE, SIZE, generator=generator).numpy())
    np.savez(root / "clean8.npz", x=torch.rand(8, 3, SIZE, SIZE, generator=generator).numpy())
    return root


def model_args(files, name="model.safetensors"):
    return ["--model", str(files / name), "--arch", "small_cnn", "--num-classes", "4"]


# ------------------------------------------------------------------------------------- calibration sample size
@pytest.mark.parametrize(("count", "fpr", "ok"), [(8, 0.01, False), (98, 0.01, False), (99, 0.01, True),
                                                  (8, 0.2, True), (3, 0.2, False), (1, 0.5, False)])
def test_calibration_needs_enough_clean_samples_for_the_fpr(count, fpr, ok):
    """The largest of n clean scores still flags 1/(n+1) of clean inputs: fewer than ⌈1/fpr⌉ − 1 is an error."""
    clean = torch.rand(count, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    detector = Brightness()
    if ok:
        threshold = detector.calibrate(clean, fpr=fpr)
        assert (detector.score(clean) > threshold).float().mean() <= fpr
    else:
        with pytest.raises(DataError, match=rf"clean_x: expected at least {max(2, min_calibration_samples(fpr))} "
                                            rf"clean samples.*got {count}"):
            detector.calibrate(clean, fpr=fpr)


def test_calibration_counts_infinite_scores_as_most_suspicious_and_refuses_an_infinite_threshold():
    clean = torch.rand(20, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    detector = Brightness(holes={0: "inf", 1: "nan"})
    threshold = detector.calibrate(clean, fpr=0.1)  # 19 scored (NaN left out), one of them inf
    assert np.isfinite(threshold)
    for value, flagged in (("inf", True), ("nan", False)):  # inf: flagged; NaN: not scored, so not flagged
        toy = Brightness(holes={0: value})
        toy.threshold = threshold
        assert toy.predict(clean[:1]).tolist() == [flagged]
    with pytest.raises(DataError, match="infinite"):
        Brightness(holes={i: "inf" for i in range(5)}).calibrate(clean, fpr=0.1)


# ------------------------------------------------------------------------------------ FeatureMahalanobis fit size
def test_feature_fit_refuses_classes_of_two_that_gave_infinite_scores(model):
    """Pairs per class: the robust location is one member, residuals are zero, the covariance collapses (on main:
    every score inf). Now a DataError naming the minimum."""
    x = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with pytest.raises(DataError, match=r"reference_data: expected at least 3 images of one class.*\[2, 2, 2, 2\]"):
        FeatureMahalanobis(model, show_progress=False).fit(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    with pytest.raises(DataError, match="do not vary within any class"):
        FeatureMahalanobis(model, show_progress=False).fit(x[:1].expand(6, -1, -1, -1).clone(), torch.zeros(6).long())


def test_feature_fit_on_a_handful_warns_and_scores_stay_finite(model):
    x = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with pytest.warns(SampleSizeWarning) as caught:
        detector = FeatureMahalanobis(model, show_progress=False).fit(x, torch.tensor([0] * 6 + [1, 2]))
    messages = [str(w.message) for w in caught]
    assert any("classes [1, 2] have fewer than 3 images" in m for m in messages)
    assert any("6 images for 64 features" in m and "at least 132 images" in m for m in messages)
    assert detector.present.tolist() == [True, False, False, False] and detector.fit_warnings == messages
    scores = detector.score(torch.rand(30, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)))
    assert torch.isfinite(scores).all() and scores.max() / scores.min() < 100


def test_feature_fit_with_enough_data_gives_no_warning(model):
    x = torch.rand(200, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(200) % 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleSizeWarning)
        detector = FeatureMahalanobis(model, show_progress=False).fit(x, labels)
    assert detector.fit_warnings == [] and detector.present.tolist() == [True, True, False, False]


# ---------------------------------------------------------------------------------- infinite scores in screening
def test_infinite_scores_are_flagged_and_ranked_first_only_nan_is_not_scored(tmp_path, model, files, cli):
    register_detector("brightness-holes", Brightness, "brightness with NaN / inf (test)")
    try:
        x = torch.rand(20, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
        result = screen(model, x, detector="brightness-holes", detector_options={"holes": {3: "nan", 5: "inf"}},
                        out_dir=tmp_path / "api", calibration=None, batch_size=8, show_progress=False)
        assert result.flagged[5] and np.isinf(result.scores[5]) and result.readable[5]
        assert not result.readable[3] and not result.flagged[3]
        assert result.summary["unscored"] == 1 and result.summary["scores"]["infinite"] == 1
        assert result.summary["top"][0]["index"] == 5
        written = json.loads((tmp_path / "api" / "summary.json").read_text())
        assert written["top"][0]["score"] == "inf" and np.isfinite(written["scores"]["max"])
        rows = ResultsFile(result.results_path).read()[1]
        assert rows.flagged[5] == 1 and np.isinf(rows.scores[5]) and rows.errors[3].startswith("not scored")
        run = cli("screen", *model_args(files), "--data", files / "data.npz", "--detector", "brightness-holes",
                  "--detector-option", 'holes={"2": "inf"}', "--calibration", "none", "--image-size", SIZE,
                  "--out", tmp_path / "cli")
        assert run.code == 0, run.err
        assert ResultsFile(tmp_path / "cli" / "results.csv").read()[1].flagged[2] == 1
    finally:
        del DETECTORS["brightness-holes"]


# ----------------------------------------------------------------------- screen: a self-fit the batch cannot support
class ChannelModel(nn.Module):
    """Synthetic classifier: class = the brightest of 3 channels; its feature layer is an identity 1×1 conv, so the
    pooled feature is the channel means."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None])
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.conv(x)).flatten(1) * 10


def channel_images(means, count, seed):
    generator = torch.Generator().manual_seed(seed)
    base = torch.tensor(means, dtype=torch.float32)[None, :, None, None]
    return (base + 0.05 * torch.randn(count, 3, 4, 4, generator=generator)).clamp(0, 1)


def test_screen_reference_fixes_a_batch_whose_target_class_is_mostly_poison(tmp_path):
    """The batch holds 2 clean images of the target class (2) and 3 poisoned ones (class-0 content + a channel-2
    trigger): fitted on all of the batch's class 2 (``typical_fallback="all"``) the target's robust location is the
    poison, which looks normal; fitted on trusted reference data it is flagged. The summary says the batch cannot
    support a self-fit. (The default fallback fits the class on its more typical half, 3 of its 5 images, and flags
    the poison: all three here, asserted with a margin of one.)"""
    model = ChannelModel().eval()
    clean = {k: [0.8 if c == k else 0.2 for c in range(3)] for k in range(3)}
    batch = torch.cat([channel_images(clean[0], 100, 0), channel_images(clean[1], 100, 1),
                       channel_images(clean[2], 2, 2), channel_images([0.8, 0.2, 0.9], 3, 3)])
    poison = np.arange(len(batch)) >= 202
    reference = torch.cat([channel_images(clean[k], 30, 10 + k) for k in range(3)])
    calibration = torch.cat([channel_images(clean[k], 20, 20 + k) for k in range(3)])
    options = {"detector": "features", "calibration": calibration, "fpr": 0.05, "report": False,
               "show_progress": False}
    self_fit = screen(model, batch, out_dir=tmp_path / "self", detector_options={"typical_fallback": "all"},
                      **options)
    assert self_fit.flagged[poison].sum() <= 1
    assert screen(model, batch, out_dir=tmp_path / "half", **options).flagged[poison].sum() >= 2
    fit = self_fit.summary["fit"]
    assert fit["on"] == "screened data" and fit["self_fit_supported"] is False
    assert any("classes [2] are rare" in m for m in fit["warnings"])
    trusted = screen(model, batch, out_dir=tmp_path / "trusted", reference=reference, **options)
    assert trusted.flagged[poison].all() and trusted.flagged[~poison].mean() <= 0.05
    assert trusted.summary["fit"]["on"] == "reference" and trusted.summary["fit"]["self_fit_supported"] is None
    saved = FeatureMahalanobis(model, show_progress=False).fit(reference).save(tmp_path / "fit.safetensors")
    from_file = screen(model, batch, out_dir=tmp_path / "file", detector_file=saved,
                       **{k: v for k, v in options.items() if k != "detector"}, detector="features")
    np.testing.assert_array_equal(from_file.flagged, trusted.flagged)


def test_screen_cli_reference_and_detector_file(tmp_path, files, model, cli):
    common = [*model_args(files), "--data", files / "data.npz", "--detector", "features", "--calibration", "none",
              "--image-size", SIZE, "--no-report"]
    self_fit = cli("screen", *common, "--out", tmp_path / "self")
    assert self_fit.code == 0, self_fit.err
    assert "warning: detector fitted on screened data" in self_fit.out and "--reference" in self_fit.out
    with_reference = cli("screen", *common, "--reference", files / "reference.npz", "--out", tmp_path / "ref")
    assert with_reference.code == 0, with_reference.err
    assert "fitted on reference" in with_reference.out or "warning" not in with_reference.out
    assert len(ResultsFile(tmp_path / "ref" / "results.csv").read()[1]) == 24
    fit = FeatureMahalanobis(model, show_progress=False).fit(torch.from_numpy(np.load(files / "reference.npz")["x"]))
    path = fit.save(tmp_path / "fit.safetensors")
    from_file = cli("screen", *common, "--detector-file", path, "--out", tmp_path / "file", subprocess=True)
    assert from_file.code == 0, from_file.err
    a = ResultsFile(tmp_path / "ref" / "results.csv").read()[1].scores
    b = ResultsFile(tmp_path / "file" / "results.csv").read()[1].scores
    np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize(("extra", "code", "words"), [
    (["--detector", "cd", "--detector-file", "{files}/model.safetensors"], 2, ["--detector-file", "features"]),
    (["--detector", "cd", "--reference", "{files}/reference.npz"], 2, ["--reference", "cd"]),
    (["--detector", "features", "--detector-file", "{files}/missing.safetensors"], 1, ["detector_file", "no file"]),
    (["--detector", "features", "--detector-file", "{files}/model.safetensors"], 1,
     ["detector_file", "expected a FeatureMahalanobis fit"]),
    (["--detector", "features", "--detector-file", "{files}/data.npz"], 1, ["detector_file", "unreadable"]),
    (["--detector", "features", "--detector-file", "{tmp}/other-fit.safetensors"], 1,
     ["detector_file", "another model"]),
    (["--detector", "features", "--calibration", "{files}/clean8.npz"], 1,
     ["calibration", "at least 99", "got 8"]),
])
def test_screen_fit_options_bad_input(tmp_path, files, cli, expect_error, extra, code, words):
    torch.manual_seed(7)
    other = build_model("small_cnn", num_classes=4).eval()
    x = torch.from_numpy(np.load(files / "reference.npz")["x"])
    FeatureMahalanobis(other, show_progress=False).fit(x).save(tmp_path / "other-fit.safetensors")
    extra = [e.format(files=files, tmp=tmp_path) for e in extra]
    result = cli("screen", *model_args(files), "--data", files / "data.npz", "--image-size", SIZE,
                 "--out", tmp_path / "out", *extra)
    expect_error(result, code, *words)
    assert not (tmp_path / "out" / "results.csv").exists()


def test_screen_fit_options_bad_input_in_a_child_process(tmp_path, files, cli, expect_error):
    result = cli("screen", *model_args(files), "--data", files / "data.npz", "--detector", "features",
                 "--detector-file", files / "model.safetensors", "--reference", files / "reference.npz",
                 "--out", tmp_path / "out", subprocess=True)
    expect_error(result, 2, "--reference", "--detector-file")
    result = cli("export", *model_args(files), "--reference", files / "reference.npz", "--calibration",
                 files / "clean8.npz", "--image-size", SIZE, "--out", tmp_path / "g.onnx", subprocess=True)
    expect_error(result, 1, "--calibration", "at least 99", "got 8")
    assert not (tmp_path / "g.onnx").exists()


def test_detector_file_api_errors(tmp_path, model, files):
    x = torch.from_numpy(np.load(files / "reference.npz")["x"])
    with pytest.raises(ValueError, match="path: expected a file name ending in .safetensors"):
        FeatureMahalanobis(model, show_progress=False).fit(x).save(tmp_path / "fit.pt")
    truncated = tmp_path / "truncated.safetensors"
    path = FeatureMahalanobis(model, show_progress=False).fit(x).save(tmp_path / "fit.safetensors")
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="detector_file: .*unreadable"):
        FeatureMahalanobis.load(truncated, model)
    with pytest.raises(ValueError, match="detector_file: expected detector 'features'"):
        screen(model, x, detector="cd", detector_file=path, out_dir=tmp_path / "o")


# ------------------------------------------------------------------------------------------------ GuardSession
@pytest.fixture(scope="module")
def session(tmp_path_factory, model):
    x = torch.rand(40, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleSizeWarning)
        detector = FeatureMahalanobis(model, show_progress=False).fit(x)
    guard = Guard(model, detector, threshold=1e6)
    path = export_onnx(guard, tmp_path_factory.mktemp("session") / "guard.onnx", x[:2])
    return GuardSession(path, providers="cpu")


def test_session_accepts_nested_lists(session):
    x = np.random.default_rng(0).random((3, 3, SIZE, SIZE), dtype=np.float32)
    from_list, from_array = session.run(x.tolist()), session.run(x)
    np.testing.assert_allclose(from_list.score, from_array.score, rtol=1e-6)
    assert session.run(np.rint(x * 0).astype(int).tolist()).score.shape == (3,)  # integer zeros: valid pixels


@pytest.mark.parametrize(("make", "words"), [
    (lambda x: [x[0].tolist(), x[1, :, :4].tolist()], ["x", "ragged"]),
    (lambda x: [[["a"] * SIZE] * SIZE] * 3, ["x", "nested list of numbers", "strings"]),
    (lambda x: "pixels", ["x", "float32 array", "got str"]),
    (lambda x: {"images": 1}, ["x", "got dict"]),
    (lambda x: x[0], ["x", f"(N, 3, {SIZE}, {SIZE})", "x[None]"]),
    (lambda x: x[:, :1], ["x", f"(N, 3, {SIZE}, {SIZE})", f"(2, 1, {SIZE}, {SIZE})"]),
    (lambda x: x[:, :, :8], ["x", f"(2, 3, 8, {SIZE})"]),
    (lambda x: x[None], ["x", "got (1, 2, 3"]),
    (lambda x: x.astype(np.float64), ["x", "float32", "float64"]),
    (lambda x: x * 255, ["x", "[0, 1]", "0–255", "divide by 255"]),
    (lambda x: (x * 255).tolist(), ["x", "0–255"]),
    (lambda x: x[:0], ["x", "empty"]),
])
def test_session_bad_inputs_are_one_line_data_errors(session, make, words):
    x = np.random.default_rng(1).random((2, 3, SIZE, SIZE), dtype=np.float32)
    with pytest.raises(DataError) as caught:
        session.run(make(x))
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_session_flags_single_nan_inf_and_slightly_out_of_range_values(session):
    x = np.random.default_rng(2).random((4, 3, SIZE, SIZE), dtype=np.float32)
    x[0, 0, 0, 0], x[1, 0, 0, 0], x[2, 0, 0, 0] = np.nan, np.inf, 1.5
    out = session.run(x)
    assert out.flagged[:3].all() and np.isinf(out.score[:3]).all() and np.isfinite(out.score[3])


DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.uint8, np.bool_])


@st.composite
def session_inputs(draw):
    """Arrays of random rank, shape (often the right one), dtype and values (NaN, ±inf, huge), or nested lists."""
    right = draw(st.booleans())
    if right:
        shape = (draw(st.integers(0, 3)), 3, SIZE, SIZE)
    else:
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=5)))
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.int64, np.uint8, np.bool_]))
    if np.issubdtype(dtype, np.floating):
        elements = st.floats(allow_nan=True, allow_infinity=True, width=32)
    elif dtype is np.bool_:
        elements = st.booleans()
    else:
        elements = st.integers(0, 255)
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    return array.tolist() if draw(st.integers(0, 4)) == 0 else array


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(x=session_inputs())
def test_session_run_gives_a_result_or_a_data_error(session, x):
    try:
        out = session.run(x)
    except DataError as error:
        assert "\n" not in str(error) and str(error).startswith("x:")
        return
    n = len(x)
    assert out.logits.shape[0] == out.score.shape[0] == out.flagged.shape[0] == n
    assert out.flagged.dtype == np.bool_ and not np.isnan(out.score).any()


# ------------------------------------------------------------------------------- the web-service example of the docs
def web_service_block() -> str:
    blocks = re.findall(r"```py\n(.*?)```", (ROOT / "docs" / "guard.md").read_text(), flags=re.DOTALL)
    return next(b for b in blocks if "ThreadingHTTPServer" in b)


def test_web_service_example_answers_400_for_every_bad_request(session):
    code = web_service_block()
    code = code.replace('GuardSession("guard.onnx", providers="auto")', f'GuardSession({str(session.path)!r}, '
                        'providers="cpu")')
    code = code.replace('ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()',
                        'server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)')
    namespace: dict = {}
    exec(compile(code, "docs/guard.md", "exec"), namespace)  # noqa: S102 — our own documentation
    server = namespace["server"]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"

        def post(body: bytes) -> tuple[int, dict]:
            request = urllib.request.Request(url, data=body, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=30) as reply:
                    return reply.status, json.loads(reply.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        x = np.random.default_rng(3).random((2, 3, SIZE, SIZE), dtype=np.float32)
        status, reply = post(json.dumps({"images": x.tolist()}).encode())
        assert status == 200 and len(reply["results"]) == 2
        x[0, 0, 0, 0] = 1.5  # out of range: flagged, score null (strict JSON)
        status, reply = post(json.dumps({"images": x.tolist()}).encode())
        assert status == 200 and reply["results"][0]["flagged"] and reply["results"][0]["score"] is None
        bad = {
            b"{not json": "expected JSON",
            b"\xff\xfe": "expected JSON",
            b"[1, 2]": "'images'",
            json.dumps({"pictures": []}).encode(): "'images'",
            json.dumps({"images": [x[0].tolist(), x[1, :1].tolist()]}).encode(): "ragged",
            json.dumps({"images": "abc"}).encode(): "got str",
            json.dumps({"images": [[["a"]]]}).encode(): "numbers",
            json.dumps({"images": x[:, :1].tolist()}).encode(): "expected shape",
            json.dumps({"images": (x * 255).tolist()}).encode(): "0–255",
        }
        for body, word in bad.items():
            status, reply = post(body)
            assert status == 400 and word in reply["error"] and "\n" not in reply["error"], (body[:40], reply)
    finally:
        server.shutdown()
        server.server_close()


def test_whitening_is_defined_for_a_numerically_singular_covariance():
    """A fit on a few near-identical images leaves Σ singular to rounding: the metric stays finite (a Cholesky
    factor of Σ⁻¹ failed here with a raw LinAlgError) and equals Σ⁻¹ wherever Σ is well conditioned."""
    from trojanguard.detect.feature_mahalanobis import whitening_matrix

    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    singular = basis @ basis.T + 1e-15 * torch.eye(6, dtype=torch.float64)  # rank 2 of 6
    assert torch.isfinite(whitening_matrix(singular)).all()
    a = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    covariance = a @ a.T + torch.eye(6, dtype=torch.float64)
    w = whitening_matrix(covariance)
    torch.testing.assert_close(w @ w.T, torch.linalg.inv(covariance), rtol=1e-9, atol=1e-9)
