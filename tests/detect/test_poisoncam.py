"""PoisonCAM (detect/poisoncam.py) on the SSL zoo's poisoned encoder (issue 17's bars), its protocols, and bad input.

The zoo encoder: SimCLR small CNN, 16-px digits, 9 % of the set with a random-position patch (tests/conftest.py's
``ssl_zoo``). Measured with the defaults (benchmarks/poisoncam_zoo.py, one thread, seeds 0–2 of the zoo): see
docs/poisoncam.md; this test runs seed 0.
"""

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from trojanguard.detect.base import Detector, Explains, Fitted, OnePass
from trojanguard.detect.poisoncam import PoisonCAM, auto_clusters
from trojanguard.errors import DataError
from trojanguard.ops.cluster_mask import box_masks

# issue 17's bars
MIN_PRECISION, MIN_RECALL = 0.9, 0.95
MIN_LOCATE_RATE = 0.9  # the box covers at least half of the true patch on this share of poisoned images
MIN_SCORE_AUROC = 0.95  # one-pass score: triggered (non-target) vs clean test images
MAX_ASR_OVER_CLEAN = 0.02  # an encoder retrained on the kept images vs the clean encoder, probe ASR


@pytest.fixture(scope="module")
def fitted(ssl_zoo):
    poisoned, _ = ssl_zoo
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the benchmark's setting (tests/conftest.py ssl_zoo says why)
    try:
        detector = PoisonCAM(poisoned.encoder, show_progress=False).fit(poisoned.train.x)
    finally:
        torch.set_num_threads(threads)
    return poisoned, detector


def cover_rate(found: torch.Tensor, truth: torch.Tensor, size) -> float:
    cover = (box_masks(found, *size) & box_masks(truth, *size)).flatten(1).sum(1) / box_masks(truth, *size).flatten(1).sum(1)
    return float((cover >= 0.5).float().mean())


@pytest.mark.slow
def test_removes_the_patch_poison_and_locates_the_patch(fitted):
    entry, detector = fitted
    result, truth = detector.result, entry.train.is_poisoned
    hits = int((result.flagged & truth).sum())
    precision, recall = hits / max(1, int(result.flagged.sum())), hits / int(truth.sum())
    index = torch.nonzero(truth).squeeze(1)
    located = cover_rate(detector.locate(entry.train.x[index]), entry.train.boxes[index], entry.train.x.shape[2:])
    print(f"\nprecision {precision:.3f} recall {recall:.3f} locate {located:.3f} seconds {result.seconds}")
    assert precision >= MIN_PRECISION and recall >= MIN_RECALL
    assert located >= MIN_LOCATE_RATE
    # the result's fields
    n = len(entry.train.x)
    assert result.poison_scores.shape == (n,) and result.flagged.dtype == torch.bool
    assert result.clusters.shape == (n,) and int(result.clusters.max()) < len(detector.centroids)
    assert detector.centroids.shape == (auto_clusters(n), 256)
    searched = ~result.search_scores.isnan()
    assert ((result.boxes >= 0).all(1) == searched).all()
    scores = [t.score for t in result.triggers]
    assert scores == sorted(scores, reverse=True) and len(scores) == detector.top_triggers
    assert all(t.crop.shape[1:] == t.box[2:] for t in result.triggers)
    assert truth[[t.index for t in result.triggers]].all()  # every extracted trigger comes from a poisoned image


@pytest.mark.slow
def test_one_pass_score_separates_triggered_from_clean_and_exports(fitted):
    entry, detector = fitted
    others = entry.test.y != entry.config.target
    triggered = entry.triggered_test()[others]
    scores = detector.score(torch.cat([triggered, entry.test.x]))
    truth = torch.cat([torch.ones(len(triggered)), torch.zeros(len(entry.test.x))])
    auroc = roc_auc_score(truth.numpy(), scores.numpy())
    print(f"\none-pass score AUROC {auroc:.4f}")
    assert auroc >= MIN_SCORE_AUROC
    features, probability = detector.as_module()(entry.test.x[:8])
    assert features.shape == (8, 256) and torch.allclose(probability, detector.score(entry.test.x[:8]), atol=1e-6)
    assert isinstance(detector, (Detector, Fitted, OnePass, Explains))
    assert (detector.predict(entry.test.x) == (detector.score(entry.test.x) > 0.5)).all()


@pytest.mark.slow
def test_heat_maps_are_hottest_on_the_patch(fitted):
    entry, detector = fitted
    index = torch.nonzero(entry.train.is_poisoned).squeeze(1)[:40]
    heat = detector.heatmaps(entry.train.x[index])
    assert heat.shape == (len(index), 16, 16) and torch.isfinite(heat).all()
    inside = box_masks(entry.train.boxes[index], 16, 16)
    mean_in = (heat * inside).flatten(1).sum(1) / inside.flatten(1).sum(1)
    mean_out = (heat * ~inside).flatten(1).sum(1) / (~inside).flatten(1).sum(1)
    share = float((mean_in > mean_out).float().mean())
    print(f"\nheat inside the patch > outside on {share:.3f} of poisoned images")
    assert share >= 0.8
    pictures = detector.explain(entry.train.x[index[:3]], index[:3].tolist())
    assert pictures["masks"].shape == (3, 1, 16, 16) and pictures["patterns"].shape == (3, 3, 16, 16)
    assert pictures["masks"].amin() == 0 and pictures["masks"].amax() == 1
    boxes = detector.locate(entry.train.x[index[:3]])
    corner = pictures["patterns"][torch.arange(3), :, boxes[:, 0], boxes[:, 1]]
    assert (corner == torch.tensor([1.0, 0.0, 0.0])).all()  # the candidate box is outlined in red


@pytest.mark.slow
def test_an_encoder_retrained_on_the_kept_images_loses_the_backdoor(fitted, ssl_zoo):
    from trojanguard.metrics import LinearProbe
    from trojanguard.ssl import train_simclr

    entry, detector = fitted
    _, clean = ssl_zoo
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kept = train_simclr(entry.train.x[~detector.result.flagged], entry.config.arch, entry.config.simclr_config(),
                            show_progress=False).encoder
    finally:
        torch.set_num_threads(threads)
    probe = LinearProbe(kept, entry.probe_train.x, entry.probe_train.y)
    asr = probe.attack_success_rate(entry.triggered_test(), entry.test.y, entry.config.target)
    print(f"\nprobe ASR: poisoned {entry.probe_attack_success_rate:.3f}, retrained on kept {asr:.3f}, "
          f"clean {clean.probe_attack_success_rate:.3f}")
    assert asr <= clean.probe_attack_success_rate + MAX_ASR_OVER_CLEAN
    assert probe.accuracy(entry.test.x, entry.test.y) >= 0.95


# ---------------------------------------------------------------- fast: options, toy fits, bad input
def toy_encoder(dim: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, dim))


def toy_images(n: int = 60, size: int = 12) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def quick(encoder, **options) -> PoisonCAM:
    return PoisonCAM(encoder, clusters=4, iterations=3, ensemble=2, rounds=1, show_progress=False, **options)


def test_a_toy_fit_runs_every_stage_and_scores_new_inputs():
    x = toy_images()
    detector = quick(toy_encoder()).fit(x)
    result = detector.result
    assert result.poison_scores.shape == (60,) and len(result.triggers) == detector.top_triggers
    assert set(result.seconds) == {"features_kmeans", "search", "classifier"}
    assert detector.locate(x[:5]).shape == (5, 4) and detector.heatmaps(x[:2], window=3, stride=1).shape == (2, 12, 12)
    assert detector.score(x[:7]).shape == (7,)
    gradcam = quick(nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                    heatmap="gradcam").fit(x)
    heat = gradcam.heatmaps(x[:3])
    assert heat.shape == (3, 12, 12) and torch.isfinite(heat).all() and (heat >= 0).all()
    from trojanguard.models import as_encoder

    conv = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Flatten())
    layered = quick(as_encoder(conv, layer="1"), heatmap="gradcam").fit(x)  # a layer's pooled map
    assert layered.heatmaps(x[:2]).shape == (2, 12, 12)
    assert auto_clusters(1437) == 22 and auto_clusters(30) == 10 and auto_clusters(10**7) == 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="an encoder on a GPU needs a CUDA device (none here)")
def test_an_encoder_on_a_gpu_runs_there_and_finds_what_the_cpu_finds():
    """The encoder runs where the caller put it; the rest of the fit stays on the CPU: the same candidate boxes,
    heat maps within 1e-4 (TF32 off: full float32 on both) and results on the CPU, for the sweep and Grad-CAM."""
    import copy

    from trojanguard.ops.cluster_sweep import full_float32

    x = toy_images()
    with full_float32():
        for options in ({}, {"heatmap": "gradcam"}):
            cpu = quick(toy_encoder(), **options).fit(x)
            gpu = quick(copy.deepcopy(toy_encoder()).cuda(), **options).fit(x)
            assert torch.equal(gpu.result.boxes, cpu.result.boxes) and gpu.result.boxes.device.type == "cpu"
            heat = gpu.heatmaps(x[:4])
            assert heat.device.type == "cpu"
            torch.testing.assert_close(heat, cpu.heatmaps(x[:4]), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(gpu.score(x[:7]), cpu.score(x[:7]), atol=1e-4, rtol=1e-4)


def test_bad_input_gets_a_one_line_error_naming_the_argument():
    x = toy_images()
    with pytest.raises(DataError, match="encoder: .*logits"):
        quick(toy_encoder(dim=10)).fit(x)

    class NaNEncoder(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 32), float("nan"))

    with pytest.raises(DataError, match="encoder: .*NaN"):
        quick(NaNEncoder()).fit(x)
    with pytest.raises(DataError, match="data: expected at least 8 images for 4 clusters, got 6"):
        quick(toy_encoder()).fit(x[:6])
    with pytest.raises(DataError, match="window"):
        quick(toy_encoder(), window=13).fit(x)
    detector = quick(toy_encoder()).fit(x)
    with pytest.raises(DataError, match=r"x: expected images of shape \(3, 12, 12\).*got \(3, 16, 16\)"):
        detector.score(torch.rand(2, 3, 16, 16))
    with pytest.raises(DataError, match="x"):
        detector.locate(torch.full((2, 3, 12, 12), float("nan")))
    with pytest.raises(DataError, match="data: .*does not exist"):
        quick(toy_encoder()).fit("/no/such/folder")
    with pytest.raises(ValueError, match="heatmap"):
        PoisonCAM(toy_encoder(), heatmap="cam")
    with pytest.raises(ValueError, match="fill"):
        PoisonCAM(toy_encoder(), fill=2.0)
    with pytest.raises(RuntimeError, match="fit"):
        PoisonCAM(toy_encoder()).score(x)


def test_a_fit_saves_and_loads_without_pickle(tmp_path):
    from trojanguard.models.io import ModelLoadError

    x = toy_images()
    encoder = toy_encoder()
    detector = quick(encoder).fit(x)
    path = detector.save(tmp_path / "fit.safetensors")
    loaded = PoisonCAM.load(path, encoder, show_progress=False)
    assert torch.equal(loaded.score(x), detector.score(x)) and torch.equal(loaded.locate(x[:4]), detector.locate(x[:4]))
    assert torch.equal(loaded.result.flagged, detector.result.flagged)
    assert [t.box for t in loaded.result.triggers] == [t.box for t in detector.result.triggers]
    with pytest.raises(ModelLoadError, match="another encoder"):
        PoisonCAM.load(path, toy_encoder(dim=33))
    with pytest.raises(ValueError, match="options: .*ensemble"):
        PoisonCAM.load(path, encoder, ensemble=5)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="unreadable"):
        PoisonCAM.load(truncated, encoder)


def test_an_encoder_only_guard_exports_features_score_and_flag(tmp_path):
    import numpy as np

    from trojanguard.guard import Guard, GuardSession, export_onnx

    x = toy_images(size=16)  # the poison classifier's adaptive pooling exports where the size divides evenly
    detector = quick(toy_encoder()).fit(x)
    guard = Guard(detector.encoder, detector)  # threshold: the detector's own (probability 0.5)
    assert guard.output_names == ("features", "score", "flagged") and guard.threshold == 0.5
    features, score, flagged = guard.run(x[:6])
    assert torch.allclose(features, detector.encoder(x[:6])) and torch.allclose(score, detector.score(x[:6]))
    path = export_onnx(guard, tmp_path / "guard.onnx", x[:2])
    session = GuardSession(path)
    out = session.run(x[:6].numpy())
    assert np.allclose(out[0], features.numpy(), atol=1e-5) and np.allclose(out[1], score.numpy(), atol=1e-5)
    assert (out[2] == flagged.numpy()).all()
    bad = x[:2].clone()
    bad[0, 0, 0, 0] = float("nan")
    assert session.run(bad.numpy())[2][0]  # a non-finite pixel is flagged inside the graph


def test_the_coarse_to_fine_search_finds_a_single_peak_with_fewer_windows(tmp_path):
    """On a drop surface with one peak, the coarse-then-fine search lands on the exhaustive search's box having
    evaluated fewer windows; the option is recorded in a fit and an older fit (without it) still loads."""
    detector = PoisonCAM(toy_encoder(), coarse_to_fine=True, show_progress=False)
    peak = torch.tensor([11, 4])
    evaluated = []

    def drops(x, own, windows):  # higher near the peak, the same for every image
        evaluated.append(len(windows) * len(x))
        return -(windows[:, :2] - peak).pow(2).sum(1).float().expand(len(x), -1)

    detector._window_drops = drops
    x, own = torch.rand(3, 3, 32, 32), torch.randn(3, 8)
    boxes = detector._coarse_then_fine(x, own, window=13, stride=1)
    assert boxes.tolist() == [[11, 4, 13, 13]] * 3
    assert sum(evaluated) < 3 * 20 * 20 / 2  # the exhaustive stride-1 search evaluates 20 × 20 windows per image
    assert detector.fit_options()["coarse_to_fine"] is True and "coarse_to_fine=True" in repr(detector)
    peak = torch.tensor([20, 20])  # a larger window: the fine grid (stride 5) must include the coarse best box itself
    far = detector._coarse_then_fine(torch.rand(1, 3, 64, 64), own[:1], window=40, stride=5)
    assert far.tolist() == [[20, 20, 40, 40]]
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    encoder = toy_encoder()
    path = quick(encoder).fit(toy_images()).save(tmp_path / "fit.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["trojanguard"])
    del meta["options"]["coarse_to_fine"]  # as a fit saved before the option existed
    save_file(load_file(str(path)), str(path), metadata={"trojanguard": json.dumps(meta)})
    assert PoisonCAM.load(path, encoder, show_progress=False).coarse_to_fine is False
