"""Batch screening (``trojanguard.screening``): streamed sources, durable resumable results, thresholds (FPR on
held-out clean data, the robust rule), the detector registry, bad inputs, and the report files.

Fast tests use an untrained small CNN on tiny random data and CD with a few steps; the FPR test uses the zoo's
BadNets model (trained once, cached) and its held-out clean digits.
"""

import json
import math
import re
import zipfile
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from helpers import random_images, small_classifier
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trojanguard.data import load_image_folder, load_npz
from trojanguard.detect import CognitiveDistillation
from trojanguard.detect.base import Detector
from trojanguard.errors import DataError
from trojanguard.models import build_model
from trojanguard.screening import (
    DETECTORS,
    DetectorUnavailableError,
    FolderSource,
    NpzSource,
    ResumeError,
    TensorSource,
    available_detectors,
    register_detector,
    screen,
)
from trojanguard.screening.records import ResultsFile
from trojanguard.screening.report import clean_flag_expectation, target_label_test
from trojanguard.thresholds import quantile_threshold, robust_threshold

CD_FAST = {"steps": 3}


@pytest.fixture(scope="module")
def model():
    return small_classifier(num_classes=4)


@pytest.fixture(scope="module")
def images():
    return random_images(20, seed=1)


def save_npz(path, x, y=None, compressed=False):
    arrays = {"x": x.numpy()} if y is None else {"x": x.numpy(), "y": y.numpy()}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def save_folder(root, x, classes=("a", "b")):
    for i, image in enumerate(x):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------------------------------------ CD pieces
def test_cd_pieces_of_a_dataset_get_the_masks_of_one_call(model, images):
    """first_index / sample_indices key each sample's noise stream by its index in the whole dataset."""
    cd = CognitiveDistillation(model, steps=4, show_progress=False)
    whole = cd.distill(images)
    (_, tail), = cd.iter_distill(images[12:], first_index=12)
    torch.testing.assert_close(tail.masks, whole.masks[12:], atol=1e-5, rtol=0)
    picked = [17, 3, 9]
    parts = [r for _, r in cd.iter_distill(images[picked], sample_indices=torch.tensor(picked))]
    torch.testing.assert_close(torch.cat([r.masks for r in parts]), whole.masks[picked], atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="sample_indices"):
        next(cd.iter_distill(images[:3], sample_indices=torch.tensor([0, 1])))


def test_cd_scorer_keeps_the_top_masks_and_recomputes_only_the_missing(model, images):
    from trojanguard.screening.detectors import build_detector

    _, scorer = build_detector("cd", model, {"steps": 4})
    scorer.keep_top = 3
    scores = torch.cat([scorer(images[i : i + 7], i)[0] for i in range(0, 20, 7)])
    top = scores.argsort(descending=True)[:3].tolist()
    assert sorted(scorer._kept) == sorted(top)
    picked = top + [0]  # index 0 is not kept: recomputed
    kept = scorer.explain(images[picked], picked)
    _, fresh = build_detector("cd", model, {"steps": 4})
    recomputed = fresh.explain(images[picked], picked)
    torch.testing.assert_close(kept["masks"], recomputed["masks"], atol=1e-5, rtol=0)
    torch.testing.assert_close(kept["patterns"], recomputed["patterns"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ sources
@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_npz_source_streams_what_load_npz_loads(tmp_path, images, compressed):
    uint8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    for x in (images, uint8):
        path = save_npz(tmp_path / "d.npz", x, torch.arange(20) % 3, compressed=compressed)
        source, loaded = NpzSource(path), load_npz(path)
        batches = list(source.batches(6))
        assert [len(b) for b in batches] == [6, 6, 6, 2]
        torch.testing.assert_close(torch.cat([b.x for b in batches]), loaded.x, atol=0, rtol=0)
        assert batches[1].labels == [str(v) for v in (torch.arange(6, 12) % 3).tolist()]
        torch.testing.assert_close(source.take([15, 2, 7]), loaded.x[[15, 2, 7]], atol=0, rtol=0)  # back and forth
        assert source.fingerprint()["crc32"] == zipfile.ZipFile(path).getinfo("x.npy").CRC


def test_folder_source_reads_per_batch_and_records_unreadable_files(tmp_path, images):
    root = save_folder(tmp_path / "imgs", images[:6])
    (root / "b" / "999_corrupt.png").write_bytes(b"not a png at all")
    source = FolderSource(root, size=16)
    loaded = load_image_folder(root, size=16)
    assert len(source) == 7 and source.class_names == ["a", "b"]
    batches = list(source.batches(4))
    errors = {b.start + k: v for b in batches for k, v in b.errors.items()}
    assert list(errors) == [6] and "unreadable image" in errors[6]
    x = torch.cat([b.x for b in batches])
    torch.testing.assert_close(x[:6], loaded.x, atol=0, rtol=0)
    assert batches[0].ids[:2] == ["a/000.png", "a/002.png"] and batches[0].labels[:1] == ["a"]


# ------------------------------------------------------------------------------------------------ screening
def test_features_screening_of_a_folder_with_a_corrupt_file(tmp_path, model, images):
    root = save_folder(tmp_path / "imgs", images)
    (root / "a" / "zz_truncated.png").write_bytes((root / "a" / "000.png").read_bytes()[:40])
    result = screen(model, root, detector="features", out_dir=tmp_path / "out", calibration=None, image_size=16,
                    batch_size=8, show_progress=False)
    assert len(result.ids) == 21 and result.readable.sum() == 20
    bad = result.ids.index("a/zz_truncated.png")
    assert math.isnan(result.scores[bad]) and not result.flagged[bad] and result.predicted[bad] == -1
    assert result.summary["unreadable"] == 1 and result.summary["unreadable_samples"][0]["id"] == "a/zz_truncated.png"
    assert "zz_truncated.png" in (tmp_path / "out" / "index.html").read_text()
    listed = {name: (tmp_path / "out" / name).read_text().splitlines() for name in ("flagged.txt", "kept.txt")}
    assert listed["flagged.txt"] == result.flagged_ids  # the next step's input: one id per line, data order
    assert listed["kept.txt"] == [i for k, i in enumerate(result.ids) if result.readable[k] and not result.flagged[k]]
    assert "a/zz_truncated.png" not in listed["flagged.txt"] + listed["kept.txt"]  # unreadable: in neither
    _, rows = ResultsFile(result.results_path).read()
    assert rows.errors[bad].startswith("unreadable image") and rows.flagged[bad] == -1


def test_results_do_not_depend_on_batch_size(tmp_path, model, images):
    a = screen(model, images, out_dir=tmp_path / "a", detector="cd", detector_options=CD_FAST, batch_size=20, calibration=None,
               report=False, show_progress=False)
    b = screen(model, images, out_dir=tmp_path / "b", detector="cd", detector_options=CD_FAST, batch_size=7, calibration=None,
               report=False, show_progress=False)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(a.predicted, b.predicted)


class _Crash(Exception):
    pass


class _CrashingSource(TensorSource):
    """Fails after ``after`` batches, like a process killed mid-run (the rows of earlier batches are durable)."""

    def __init__(self, x, after):
        super().__init__(x)
        self.after, self.reads = after, 0

    def read(self, start, stop):
        self.reads += 1
        if self.reads > self.after:
            raise _Crash
        return super().read(start, stop)


def test_interrupted_run_resumes_to_the_uninterrupted_result_torn_line_included(tmp_path, model, images):
    """In-process: a run stops after 2 batches, a torn half row is appended (a kill during a write); the resumed
    run equals an uninterrupted one exactly. (tests/cli/test_screen_command.py really SIGKILLs a subprocess.)"""
    options = {"detector": "cd", "detector_options": CD_FAST, "batch_size": 6, "calibration": None, "show_progress": False}
    whole = screen(model, images, out_dir=tmp_path / "whole", **options)
    with pytest.raises(_Crash):
        screen(model, _CrashingSource(images, after=3), out_dir=tmp_path / "cut", **options)  # 1 check + 2 batches
    path = tmp_path / "cut" / "results.csv"
    assert len(ResultsFile(path).read()[1]) == 12
    with open(path, "a") as f:
        f.write("12,12,,3,0.12")  # torn: no newline
    resumed = screen(model, images, out_dir=tmp_path / "cut", **options)
    assert resumed.resumed_from == 12 and resumed.summary["run"]["screened_now"] == 8
    np.testing.assert_array_equal(resumed.scores, whole.scores)
    np.testing.assert_array_equal(resumed.flagged, whole.flagged)
    assert resumed.threshold == whole.threshold
    assert (tmp_path / "cut" / "results.csv").read_text().splitlines()[1:] == \
        (tmp_path / "whole" / "results.csv").read_text().splitlines()[1:]


def test_resume_refuses_results_of_a_different_run(tmp_path, model, images):
    options = {"detector": "cd", "detector_options": CD_FAST, "batch_size": 10, "calibration": None, "report": False,
               "show_progress": False}
    screen(model, images, out_dir=tmp_path, **options)
    with pytest.raises(ResumeError, match=r"data\..*different run|different run.*data"):
        screen(model, images.flip(0), out_dir=tmp_path, **options)
    with pytest.raises(ResumeError, match="detector"):
        screen(model, images, out_dir=tmp_path, **{**options, "detector_options": {"steps": 4}})
    torch.manual_seed(5)
    other = build_model("small_cnn", num_classes=4).eval()
    with pytest.raises(ResumeError, match="model_sha256"):
        screen(other, images, out_dir=tmp_path, **options)
    again = screen(other, images, out_dir=tmp_path, overwrite=True, **options)
    assert again.resumed_from == 0
    (tmp_path / "results.csv").write_text("id,score\n1,2\n")  # no longer a screening run's folder: never overwritten
    with pytest.raises(ResumeError, match="out_dir: expected a new or empty folder.*results.csv"):
        screen(other, images, out_dir=tmp_path, overwrite=True, **options)
    assert (tmp_path / "results.csv").read_text() == "id,score\n1,2\n"


def test_robust_rule_flags_outliers_and_fills_flags_at_the_end(tmp_path, model, images):
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, 2000)
    threshold = robust_threshold(np.concatenate([clean, np.full(100, 9.0)]))  # 5 % far outliers
    assert 3.3 < threshold < 3.9  # median + 3.5 σ, barely moved by the outliers
    assert (clean > threshold).mean() < 0.002
    assert robust_threshold(np.array([1.0] * 10 + [2.0, 3.0])) > 1.0  # MAD = 0: mean absolute deviation
    result = screen(model, images, out_dir=tmp_path, detector="cd", detector_options=CD_FAST, calibration=None, report=False,
                    show_progress=False)
    assert result.rule == "robust_z" and result.threshold == pytest.approx(robust_threshold(result.scores))
    meta, rows = ResultsFile(result.results_path).read()
    assert meta["complete"] and meta["threshold"] == result.threshold
    np.testing.assert_array_equal(rows.flagged, result.flagged.astype(np.int8))


def test_a_new_detector_plugs_in_with_one_line(tmp_path, model, images):
    class Brightness(Detector):  # toy: mean pixel value
        def __init__(self, model, scale=1.0):
            self.scale = scale

        def score(self, x):
            return x.flatten(1).mean(1) * self.scale

    register_detector("brightness", Brightness, "mean pixel value (test)")
    try:
        result = screen(model, images, detector="brightness", detector_options={"scale": 2.0}, out_dir=tmp_path,
                        threshold=1.0, calibration=None, show_progress=False)
        np.testing.assert_allclose(result.scores, images.flatten(1).mean(1).double().numpy() * 2, rtol=1e-6)
        assert result.rule == "fixed" and result.flagged.sum() == (result.scores > 1.0).sum()
        assert available_detectors()["brightness"] is None
    finally:
        del DETECTORS["brightness"]


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_give_clear_errors(tmp_path, model, images):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="neither an existing file or folder"):
        screen(model, tmp_path / "missing", out_dir=out)
    with pytest.raises(DataError, match="no array named 'x'"):
        screen(model, _npz(tmp_path / "k.npz", images=images.numpy()), out_dir=out)
    with pytest.raises(DataError, match="expected 4 dimensions"):
        screen(model, _npz(tmp_path / "d3.npz", x=images[:, 0].numpy()), out_dir=out)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        screen(model, _npz(tmp_path / "r.npz", x=(images * 3).numpy()), out_dir=out, calibration=None,
               show_progress=False)
    with pytest.raises(DataError, match="NaN"):
        bad = images.clone()
        bad[3, 0, 0, 0] = math.nan
        screen(model, _npz(tmp_path / "n.npz", x=bad.numpy()), out_dir=out, calibration=None, overwrite=True)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not an .npz"):
        screen(model, tmp_path / "notes.txt", out_dir=out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        screen(model, empty, out_dir=out)
    gray = build_model("small_cnn", num_classes=4, in_channels=1).eval()
    with pytest.raises(DataError, match=r"model: cannot take the data's images of shape \(3, 16, 16\)"):
        screen(gray, images, out_dir=out)
    with pytest.raises(DetectorUnavailableError, match="unknown name 'nope'"):
        screen(model, images, detector="nope", out_dir=out)
    with pytest.raises(DetectorUnavailableError, match="does not take these options"):
        screen(model, images, detector_options={"stepz": 3}, out_dir=out)
    with pytest.raises(ValueError, match="pass one of them"):
        screen(model, images, threshold=0.5, calibration=images, out_dir=out)
    with pytest.raises(ValueError, match="at least 2"):
        screen(model, images, calibration=images[:1], detector="cd", detector_options=CD_FAST, out_dir=out, overwrite=True,
               show_progress=False)
    with pytest.raises(ValueError, match="fpr"):
        screen(model, images, fpr=1.5, out_dir=out)


def test_non_finite_scores_are_never_written_as_scores(tmp_path, model, images):
    """A detector that returns NaN / inf for some images: those rows say so and are left out of the threshold and
    the statistics (the summary stays valid JSON); a detector that scores nothing stops the run with a clear error."""
    class Holes(Detector):  # toy: brightness, with holes where the test puts them
        def __init__(self, model, holes=()):
            self.holes, self.seen = holes, 0  # (index in the screened data, "nan" / "inf"); scored in order

        def score(self, x):
            scores = x.flatten(1).mean(1)
            for i, value in self.holes:
                if self.seen <= i < self.seen + len(x):
                    scores[i - self.seen] = float(value)
            self.seen += len(x)
            return scores

    register_detector("holes", Holes, "brightness with NaN / inf (test)")
    try:
        result = screen(model, images, detector="holes", detector_options={"holes": [(3, "nan"), (5, "inf")]},
                        out_dir=tmp_path / "some", calibration=None, batch_size=8, show_progress=False)
        errors = {i: e for i, e in enumerate(result.summary["unreadable_samples"])}
        assert result.summary["unscored"] == 1 and result.summary["unreadable"] == 0
        assert [e["index"] for e in errors.values()] == [3]
        assert "not scored: holes returned nan" in errors[0]["error"]
        assert not result.readable[3] and result.readable.sum() == len(images) - 1
        assert np.isfinite(result.summary["scores"]["max"]) and not result.flagged[3]
        assert result.flagged[5] and result.summary["top"][0]["index"] == 5  # inf: the most suspicious
        json.loads((tmp_path / "some" / "summary.json").read_text())  # allow_nan=False: would have raised
        with pytest.raises(DataError, match="none of the 20 samples could be screened.*not scored"):
            screen(model, images, detector="holes", out_dir=tmp_path / "none", calibration=None, batch_size=8,
                   detector_options={"holes": [(i, "nan") for i in range(20)]}, show_progress=False)
    finally:
        del DETECTORS["holes"]


@pytest.mark.slow
def test_amortized_screening_ranks_the_poison_first(tmp_path, zoo_badnets, monkeypatch, capsys):
    """``amortized``: CD scores a 32-image subset of the screened data, the head learns its ranking and scores all
    240 (25 poisoned BadNets images) in one pass each; the threshold comes from clean test images. With bars
    forced on for terminals, ``show_progress=False`` still silences the detector's fit."""
    from trojanguard.metrics import auroc

    monkeypatch.setenv("TROJANGUARD_PROGRESS", "1")
    x, truth = zoo_badnets.train.dataset.x[:240], zoo_badnets.train.is_poisoned[:240]
    result = screen(zoo_badnets.model, x, detector="amortized", calibration=zoo_badnets.test.x[:CALIBRATION],
                    fpr=FPR, detector_options={"max_teacher_images": 32},
                    out_dir=tmp_path, batch_size=64, show_progress=False)
    assert "it/s" not in capsys.readouterr().err
    assert np.isfinite(result.scores).all() and result.summary["unscored"] == 0
    assert auroc(truth, torch.from_numpy(result.scores)) >= 0.95
    assert result.flagged[truth.numpy()].mean() >= 0.8 and result.flagged[~truth.numpy()].mean() <= 0.15


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------------------------ report
class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href")]


def test_report_files_exist_are_non_empty_and_the_page_links_resolve(tmp_path, model, images):
    result = screen(model, images, out_dir=tmp_path, detector="cd", detector_options=CD_FAST, calibration=images[:10], fpr=0.2,
                    top_k=5, show_progress=False, command="trojanguard screen --data 'my data.npz'")
    for name in ("results.csv", "calibration.csv", "summary.json", "histogram.png", "suspicious.png", "masks.png",
                 "index.html", "kept.txt"):
        assert (tmp_path / name).stat().st_size > 0, name
    for name in ("histogram.png", "suspicious.png", "masks.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.size[0] > 300 and picture.size[1] > 200
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["samples"] == 20 and summary["threshold"]["rule"] == "quantile"
    assert summary["flagged"] == int(result.flagged.sum()) and len(summary["top"]) == 20
    assert [t["score"] for t in summary["top"]] == sorted((t["score"] for t in summary["top"]), reverse=True)
    assert summary["mask_means"]["flagged"] == summary["flagged"] > 0
    assert summary["mask_means"]["unflagged"] == 20 - summary["flagged"]
    page = (tmp_path / "index.html").read_text()
    parser = _Links()
    parser.feed(page)
    assert {"histogram.png", "suspicious.png", "masks.png", "results.csv", "summary.json", "flagged.txt",
            "kept.txt"} <= set(parser.links)
    for link in parser.links:
        assert not re.match(r"^[a-z]+:|^/", link), link  # relative links only: the folder can be moved
        assert (tmp_path / link).is_file(), link
    assert "most suspicious" in page and f"{summary['flagged']} of 20" in page
    assert "trojanguard screen --data &#x27;my data.npz&#x27;" in page and summary["data"]["digest"] in page
    assert "expected from clean samples alone" in page and "Threshold without clean data" not in page


def test_run_times_are_split_and_end_to_end_throughput_includes_them(tmp_path, model, images):
    result = screen(model, images, out_dir=tmp_path, detector="cd", detector_options=CD_FAST, calibration=images[:10], fpr=0.2,
                    top_k=3, show_progress=False)
    run = result.summary["run"]
    assert run["calibration_seconds"] > 0 and run["report_seconds"] > 0 and run["fit_seconds"] >= 0
    assert run["total_seconds"] >= run["seconds"] + run["calibration_seconds"] + run["report_seconds"]
    assert run["end_to_end_images_per_second"] == pytest.approx(20 / run["total_seconds"])
    assert run["end_to_end_images_per_second"] < run["images_per_second"]
    assert json.loads((tmp_path / "summary.json").read_text())["run"]["report_seconds"] == run["report_seconds"]


class _BrightModel(torch.nn.Module):
    """Toy classifier: bright images (mean > 0.6) are class 3; others the channel with the largest mean (0–2)."""

    def forward(self, x):
        means = x.flatten(2).mean(2)
        return torch.cat([means, 10 * (x.flatten(1).mean(1, keepdim=True) - 0.6)], 1)


class _Brightness(Detector):
    def __init__(self, model):
        pass

    def score(self, x):
        return x.flatten(1).mean(1)


@pytest.fixture
def brightness():
    register_detector("brightness-test", _Brightness, "mean pixel value (test)")
    yield "brightness-test"
    del DETECTORS["brightness-test"]


def test_report_separates_the_excess_over_chance_and_names_the_target(tmp_path, brightness):
    """100 dark images and 20 bright ones (predicted 3, the 'target'), threshold at 2 % on 200 dark images: about
    3 clean flags are expected, the 20 bright ones are beyond chance and the flags point at label 3."""
    generator = torch.Generator().manual_seed(0)
    dark = torch.rand(300, 3, 8, 8, generator=generator) * 0.5
    bright = 0.8 + 0.2 * torch.rand(20, 3, 8, 8, generator=generator)
    result = screen(_BrightModel(), torch.cat([dark[:100], bright]), detector=brightness, calibration=dark[100:],
                    fpr=0.02, out_dir=tmp_path, show_progress=False)
    chance, target = result.summary["clean_flags"], result.summary["target"]
    assert result.flagged[100:].all() and 0 < chance["expected"] < 6
    assert chance["beyond_chance"] >= 15 and chance["p_value"] < 1e-6
    assert target["label"] == "3" and target["likely"] and target["p_value"] < 1e-6
    page = (tmp_path / "index.html").read_text()
    assert "Likely target class: 3" in page and "more than chance explains" in page and "beta-binomial" in page
    assert not (tmp_path / "masks.png").exists()  # a detector without masks: no mask figure


def test_robust_rule_report_carries_a_banner(tmp_path, images, brightness):
    result = screen(_BrightModel(), images, detector=brightness, calibration=None, out_dir=tmp_path,
                    show_progress=False)
    page = (tmp_path / "index.html").read_text()
    assert result.rule == "robust_z" and "Threshold without clean data" in page and "does not control" in page
    assert result.summary["clean_flags"]["p_value"] is None  # no chance comparison the rule cannot back


def test_beta_binomial_null_holds_its_level_where_the_binomial_does_not():
    """Clean data only, threshold from 40 clean scores at fpr 0.05: the reported p-value falls under 0.05 at most
    about 5 % of the time; a plain binomial(N, fpr), blind to the calibration set's size, about twice as often."""
    from scipy import stats

    rng = np.random.default_rng(0)
    p_values, plain, counts, expected = [], [], [], []
    for _ in range(400):
        calibration = rng.normal(size=40)
        threshold = quantile_threshold(calibration, 0.05, "calibration")
        flags = int((rng.normal(size=100) > threshold).sum())
        chance = clean_flag_expectation(flags, 100, "quantile", fpr=0.05, calibration=calibration, threshold=threshold)
        p_values.append(chance["p_value"])
        plain.append(stats.binom.sf(flags - 1, 100, 0.05))
        counts.append(flags)
        expected.append(chance["expected"])
    assert abs(np.mean(counts) - np.mean(expected)) < 0.5
    assert np.mean(np.array(p_values) < 0.05) <= 0.07 < np.mean(np.array(plain) < 0.05)
    ten = clean_flag_expectation(10, 100, "quantile", fpr=0.05)  # the example, reference scores unknown
    assert ten["expected"] == 5 and ten["chance_upper"] == 9 and ten["beyond_chance"] == 1
    assert ten["p_value"] == pytest.approx(stats.binom.sf(9, 100, 0.05))
    assert clean_flag_expectation(3, 100, "fixed")["expected"] is None


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 4), min_size=1, max_size=60), data=st.data())
def test_target_test_is_a_p_value_of_a_present_label(labels, data):
    predicted = np.array(labels)
    flagged = np.array(data.draw(st.lists(st.booleans(), min_size=len(labels), max_size=len(labels))))
    result = target_label_test(predicted, flagged)
    if not flagged.any():
        assert result is None
        return
    assert 0 <= result["p_value"] <= 1 and int(result["label"]) in set(labels)
    assert result["likely"] == (result["p_value"] < 0.01)
    assert result["flagged"] == int((predicted[flagged] == int(result["label"])).sum())


def test_flags_spread_like_the_labels_point_at_no_target():
    predicted = np.arange(200) % 10
    spread = (np.arange(200) // 10) % 5 == 0  # 40 flags, 4 per label
    assert not target_label_test(predicted, spread)["likely"]
    piled = spread.copy()
    piled[predicted == 7] = True  # every sample of label 7 flagged
    result = target_label_test(predicted, piled)
    assert result["label"] == "7" and result["likely"]


def test_grid_captions_carry_the_sample_ids(tmp_path, model, images, monkeypatch):
    from trojanguard.screening import report as reporting

    captions = []
    original = reporting.write_grid
    monkeypatch.setattr(reporting, "write_grid", lambda path, x, text, **kw: captions.extend(text) or original(
        path, x, text, **kw))
    root = save_folder(tmp_path / "imgs", images[:8], classes=("a-rather-long-class-name", "b"))
    result = screen(model, root, detector="features", out_dir=tmp_path / "out", calibration=None, image_size=16,
                    top_k=4, show_progress=False)
    top = result.summary["top"][:4]
    assert len(captions) == 4
    for caption, item in zip(captions, top):
        assert caption.startswith(f"#{item['rank']} {reporting.short_id(item['id'])}\n")
    assert reporting.short_id("a-rather-long-class-name/003.png") == "…lass-name/003.png"


# ------------------------------------------------------------------------------------------------ progress
class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_off_a_terminal_prints_plain_lines_every_tenth_but_not_too_often(monkeypatch, capsys):
    from trojanguard import progress as progress_module

    clock = _Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    monkeypatch.delenv("TROJANGUARD_PROGRESS", raising=False)
    bar = progress_module.progress_bar(1000, desc="screening (cd)", unit="img")
    assert isinstance(bar, progress_module.PlainProgress)  # capsys: stderr is not a terminal
    for _ in range(100):  # 10 img per second: 100 s in all
        clock.now += 1.0
        bar.update(10)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert 3 <= len(lines) <= 5  # one per 30 s at most (10 % steps come every 10 s here), and the last one
    assert lines[0].startswith("screening (cd): 300/1000 img (30 %), 10 img/s") and "left" in lines[0]
    assert lines[-1].startswith("screening (cd): done, 1000/1000 img (100 %)")
    quick = progress_module.progress_bar(10, desc="quick")
    quick.update(10)
    quick.close()
    assert capsys.readouterr().err == ""  # a task shorter than 30 s leaves the log alone
    monkeypatch.setenv("TROJANGUARD_PROGRESS", "0")
    silent = progress_module.progress(range(5), desc="silent")
    assert list(silent) == list(range(5)) and isinstance(silent, range)


def test_progress_of_a_slow_task_keeps_a_heartbeat(monkeypatch, capsys):
    from trojanguard import progress as progress_module

    clock = _Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    monkeypatch.delenv("TROJANGUARD_PROGRESS", raising=False)
    for _ in progress_module.progress(iter(range(4)), desc="epochs"):  # unknown size, 10 minutes per item
        clock.now += 600
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "epochs: 1 it, 0.00167 it/s, 10m00s elapsed" and len(lines) == 5


# ------------------------------------------------------------------------------------------------ FPR
@pytest.fixture(scope="module")
def zoo_badnets():
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    return get_backdoored_model(ZooConfig(attack="badnets"), show_progress=False)


CALIBRATION = 180  # clean test digits for the threshold; the other 179 are held out
FPR = 0.05


@pytest.mark.slow
@pytest.mark.parametrize("detector, options", [("features", {}), ("cd", {"steps": 5})], ids=["features", "cd"])
def test_calibration_hits_the_requested_fpr_on_held_out_clean_data(tmp_path, zoo_badnets, detector, options):
    """Threshold from 180 clean images at fpr 0.05; the other 179 clean images are flagged at 0.05 give or take
    3 standard deviations of the difference of two binomial proportions. ``features`` is fitted on the screened
    (clean) data itself."""
    clean = zoo_badnets.test.x
    result = screen(zoo_badnets.model, clean[CALIBRATION:], detector=detector, detector_options=options,
                    calibration=clean[:CALIBRATION], fpr=FPR, out_dir=tmp_path, batch_size=128, report=False,
                    show_progress=False)
    rate = float(result.flagged.mean())
    sd = math.sqrt(FPR * (1 - FPR) * (1 / CALIBRATION + 1 / (len(clean) - CALIBRATION)))
    assert abs(rate - FPR) <= 3 * sd, rate
    assert result.rule == "quantile" and result.summary["threshold"]["fpr"] == FPR
