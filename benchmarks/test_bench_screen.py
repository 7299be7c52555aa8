"""Screening throughput (images/s) of ``trojanguard.screening.screen`` for each detector (CPU, or CUDA where there
is a GPU), and its overhead
over the bare detector on the same images in memory (the yardstick, ``baseline``), one run.

Entries per detector: ``baseline`` — the detector alone on an in-memory tensor (``features``: fit + score, as
screening does); ``screen-npz`` — ``screen()`` streaming the same images from an ``.npz`` file (read per batch,
one durable fsync'ed row per sample, threshold by the robust rule, no report); ``screen-folder`` — from a folder
of PNG files (decoded per batch); ``screen-npz-report`` — as ``screen-npz`` plus the report. The model is the zoo's
BadNets small CNN (trained once, cached) and the data its poisoned training images (3×32×32), tiled to the
count: speed does not depend on the weights, but ``amortized`` needs a model whose CD scores differ (on an
untrained network CD gives every image the same score and the head has nothing to learn). ``amortized`` fits on
the screened data: CD on a seeded subset (``max_teacher_images``: 64 on CPU, the default 1 024 on GPU), then
one forward pass per image.

Run: ``python -m pytest benchmarks/test_bench_screen.py --benchmark-only``.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from trojanguard.screening import available_detectors, screen
from trojanguard.screening.detectors import build_detector
from trojanguard.zoo import ZooConfig, get_backdoored_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMAGES = {"cd": 64, "features": 2048, "amortized": 2048} if DEVICE == "cpu" else \
    {"cd": 2048, "features": 16384, "amortized": 16384}
TEACHER_IMAGES = {"max_teacher_images": 64} if DEVICE == "cpu" else {}  # amortized: CD scores this many to fit
OPTIONS = {"cd": {}, "features": {}, "amortized": {"show_progress": False, **TEACHER_IMAGES}}
BATCH = 64 if DEVICE == "cpu" else 512
ENTRIES = ("baseline", "screen-npz", "screen-folder", "screen-npz-report")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    entry = get_backdoored_model(ZooConfig(attack="badnets"), show_progress=False)
    model = entry.model.to(DEVICE).eval()
    root = tmp_path_factory.mktemp("bench-screen")
    train = entry.train.dataset.x
    x = train[torch.arange(max(IMAGES.values())) % len(train)]
    pixels = (x * 255).round().to(torch.uint8)
    x = pixels.float() / 255  # the same values from every source
    data = {}
    for name, count in IMAGES.items():
        np.savez(root / f"{name}.npz", x=pixels[:count].permute(0, 2, 3, 1).numpy())
        folder = root / f"{name}-png"
        folder.mkdir()
        for i, image in enumerate(pixels[:count].permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image).save(folder / f"{i:05d}.png")
        data[name] = {"tensor": x[:count], "npz": root / f"{name}.npz", "folder": folder}
    for name, why in available_detectors().items():  # one-off costs (imports, first kernels) out of the timings
        if why is None and name in IMAGES:
            warm = {"cd": {"steps": 2}, "amortized": {"max_teacher_images": 8}}.get(name)
            screen(model, x[:8], detector=name, out_dir=root / f"warm-{name}", calibration=None, threshold=0.5,
                   batch_size=4, detector_options=warm, top_k=2, show_progress=False)
    return model, data, root


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("detector", list(IMAGES))
def test_screening_throughput_cpu(benchmark, setup, detector, entry, tmp_path):
    if available_detectors()[detector] is not None:
        pytest.skip(f"{detector}: {available_detectors()[detector]}")
    model, data, _ = setup
    images = data[detector]
    count = len(images["tensor"])
    benchmark.group = f"screening throughput, {detector}, small CNN, {count} images, {DEVICE}"
    runs = iter(range(1_000))

    if entry == "baseline":
        def run():
            built, _ = build_detector(detector, model, {"batch_size": BATCH, **OPTIONS[detector]})
            if callable(getattr(built, "fit", None)):
                built.fit(images["tensor"])
            scores = built.score(images["tensor"])
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            return scores
    else:
        source = images["folder"] if entry == "screen-folder" else images["npz"]

        def run():
            return screen(model, source, detector=detector, out_dir=tmp_path / str(next(runs)), calibration=None,
                          batch_size=BATCH, detector_options=OPTIONS[detector] or None,
                          report=entry == "screen-npz-report", show_progress=False)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info["images/s"] = round(count / benchmark.stats.stats.median, 1)
