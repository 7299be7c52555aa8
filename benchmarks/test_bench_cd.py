"""End to end: images per second of Cognitive Distillation (100 steps) — the SDK detector (its defaults: CD-P;
per step the same work as CD-L — one forward, one input gradient, the mask step) vs the baseline that
follows the authors' recipe line by line (``cd_baseline.py``), same images, same model, one run.

Run: ``python -m pytest benchmarks/test_bench_cd.py --benchmark-only``. AUROC parity of the two is measured
by ``cd_effectiveness.py`` (speed does not depend on the weights, so untrained models are timed here).
"""

import sys
from pathlib import Path

import pytest
import torch

from trojanguard.detect import CognitiveDistillation
from trojanguard.detect.cognitive_distillation import cpu_has_fast_bf16
from trojanguard.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from cd_baseline import baseline_cd_l1

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 100
# On a GPU, enough images (16 and 8 batches of 256) that the one-off capture of the CUDA graph is amortised as in a
# real screening job. One small batch is run first, untimed (on every device), so one-off costs stay out of all
# variants alike: Triton compilation, cuDNN autotuning, a just-in-time build of the C++ extension.
IMAGES = {"small_cnn": 128, "resnet18_cifar": 32} if DEVICE == "cpu" else {"small_cnn": 4096, "resnet18_cifar": 2048}
VARIANTS = {
    "baseline": None,
    "sdk": {},
    "sdk-reference-ops-nchw": {"backend": "reference", "channels_last": False, "fuse_conv_bn": False},
    "sdk-early-stop": {"early_stop": 0.01},
}
if DEVICE == "cpu" and cpu_has_fast_bf16():  # precision="auto" is bf16 here: show what it buys
    VARIANTS |= {"sdk-fp32": {"precision": "fp32"}}
if DEVICE == "cuda":  # what each GPU measure buys: graphs off, then fp32 network as well
    VARIANTS |= {"sdk-no-cuda-graphs": {"cuda_graphs": False},
                 "sdk-fp32": {"precision": "fp32"},
                 "sdk-fp32-no-cuda-graphs": {"precision": "fp32", "cuda_graphs": False}}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(IMAGES))
def test_cd_end_to_end(benchmark, arch, variant):
    torch.manual_seed(0)
    model = build_model(arch).to(DEVICE).eval()
    x = torch.rand(IMAGES[arch], 3, 32, 32, device=DEVICE)
    benchmark.group = f"CD end to end (100 steps) {arch} {DEVICE}"
    options = VARIANTS[variant]
    if options is None:
        def run(images):
            return baseline_cd_l1(model, images, steps=STEPS, batch_size=100 if arch == "small_cnn" else 64)
    else:
        detector = CognitiveDistillation(model, steps=STEPS, show_progress=False, **options)

        def run(images):
            return detector.score(images)

    def timed(images=x):
        run(images)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    timed(x[:256] if DEVICE == "cuda" else x[:8])  # untimed: extension load or just-in-time build, kernel selection

    benchmark.pedantic(timed, rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info["images/s"] = round(len(x) / benchmark.stats.stats.median, 1)
