"""Screening throughput (images/s) of ``trojanguard.screening.screen`` for each detector (CPU, or CUDA where there
is a GPU), and its overhead
over the bare detector on the same images in memory (the yardstick, ``baseline``), one run.

Entries per detector: ``baseline`` — the detector alone on an in-memory tensor (``features``: fit + score, as
screening does); ``screen-npz`` — ``screen()`` streaming the same images from an ``.npz`` file (read per batch,
one durable fsync'ed row per sample, threshold by the robust rule, no report); ``screen-folder`` — from a folder
of PNG files (decoded per batch); ``screen-npz-report`` — as ``screen-npz`` plus the report (for CD the top-16
masks are recomputed). Speed does not depend on the weights, so an untrained small CNN is timed (3×32×32).

Run: ``python -m pytest benchmarks/test_bench_screen.py --benchmark-only``.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from trojanguard.models import build_model
from trojanguard.screening import available_detectors, screen
from trojanguard.screening.detectors import build_detector

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMAGES = {"cd": 64, "features": 2048, "amortized": 512} if DEVICE == "cpu" else \
    {"cd": 2048, "features": 16384, "amortized": 16384}
BATCH = 64 if DEVICE == "cpu" else 512
ENTRIES = ("baseline", "screen-npz", "screen-folder", "screen-npz-report")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("small_cnn").to(DEVICE).eval()
    root = tmp_path_factory.mktemp("bench-screen")
    x = torch.rand(max(IMAGES.values()), 3, 32, 32, generator=torch.Generator().manual_seed(1))
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
            screen(model, x[:8], detector=name, out_dir=root / f"warm-{name}", calibration=None, threshold=0.5, batch_size=4,
                   detector_options={"steps": 2} if name == "cd" else None, top_k=2, show_progress=False)
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
            built, _ = build_detector(detector, model, {"batch_size": BATCH} if detector != "amortized" else None)
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
                          batch_size=BATCH, report=entry == "screen-npz-report", show_progress=False)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info["images/s"] = round(count / benchmark.stats.stats.median, 1)
