"""Op level: the fused mask_step on every available backend vs the pure-PyTorch reference (same device).

Run: ``python -m pytest benchmarks/test_bench_mask_step.py --benchmark-only`` (ratios printed at the end).
"""

import pytest
import torch

from trojanguard.ops import OPS, MaskStepParams, mask_step, uniform_noise

SHAPES = {"256x3x32x32": (256, 3, 32, 32), "64x3x224x224": (64, 3, 224, 224)}
PARAMS = MaskStepParams(lr=0.1, beta1=0.1, beta2=0.1, eps=1e-8, l1_weight=0.01, tv_weight=1.0, step=5)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(n, c, h, w):
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(n, 1, h, w, generator=g)
    seeds = torch.arange(n)
    tensors = [theta, torch.zeros_like(theta), torch.zeros_like(theta), torch.rand(n, c, h, w, generator=g),
               uniform_noise(seeds, PARAMS.step, c), torch.randn(n, c, h, w, generator=g) * 1e-2, seeds]
    mean, std = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.25])
    return [t.to(DEVICE) for t in tensors], mean.to(DEVICE), std.to(DEVICE)


@pytest.mark.parametrize("backend", ["reference", "cpp", "cuda", "triton"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_mask_step(benchmark, shape, backend):
    tensors, mean, std = inputs(*SHAPES[shape])
    reasons = OPS["mask_step"].reasons(*tensors, PARAMS, mean, std, None)[backend]
    if reasons or (backend == "triton" and DEVICE == "cpu"):
        pytest.skip(f"{backend}: {'; '.join(reasons) or 'the Triton interpreter is not a benchmark'}")
    benchmark.group = f"mask_step {shape} {DEVICE}"

    def step():
        mask_step(*tensors, PARAMS, mean, std, backend=backend)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=20 if DEVICE == "cuda" else 5, warmup_rounds=2, iterations=1)
    moved = sum(t.numel() * t.element_size() for t in tensors[:4] + tensors[5:6]) + sum(
        t.numel() * t.element_size() for t in tensors[:3] + tensors[3:4])  # read θ,m,v,x,g; write θ,m,v,x_adv
    benchmark.extra_info["GB/s"] = round(moved / benchmark.stats.stats.median / 1e9, 1)
