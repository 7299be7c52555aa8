"""Op level: the sweep's three ops (occlude, cluster_drop, occlusion_heat) on every available backend vs their
pure-PyTorch references (same device), at the sweep's two sizes of issue 22: N=256, 3×32×32, W=121 (window 6,
11 × 11 positions evenly spread) and N=32, 3×224×224, W=729 (window 16, stride 8; GPU only: its masked copies are
14 GB). D = 512 features.

Run: ``python -m pytest benchmarks/test_bench_cluster_sweep.py --benchmark-only`` (ratios printed at the end).
"""

import pytest
import torch

from trojanguard.ops import OPS
from trojanguard.ops.cluster_sweep import cluster_drop, occlude, occlusion_heat

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = {"256x3x32x32_W121": (256, 32, 6, 11), "32x3x224x224_W729": (32, 224, 16, 27)}  # N, side, window, positions
FEATURES = 512


def grid(side: int, window: int, positions: int) -> torch.Tensor:
    starts = torch.linspace(0, side - window, positions).round().long()
    return torch.tensor([(t, l, window, window) for t in starts.tolist() for l in starts.tolist()], dtype=torch.long)


def inputs(size: str):
    n, side, window, positions = SIZES[size]
    g = torch.Generator().manual_seed(0)
    windows = grid(side, window, positions)
    x = torch.rand(n, 3, side, side, generator=g)
    return {"occlude": (x, windows, torch.rand(n, 3, generator=g)),
            "cluster_drop": (torch.randn(n * len(windows), FEATURES, generator=g), torch.randn(n, FEATURES, generator=g),
                             torch.rand(n, generator=g)),
            "occlusion_heat": (torch.randn(n, len(windows), generator=g), windows, side, side)}


RUN = {"occlude": occlude, "cluster_drop": cluster_drop, "occlusion_heat": occlusion_heat}


@pytest.mark.parametrize("backend", ["reference", "cpp", "cuda", "triton"])
@pytest.mark.parametrize("op", list(RUN))
@pytest.mark.parametrize("size", list(SIZES))
def test_cluster_sweep_op(benchmark, size, op, backend):
    if size.startswith("32x3x224") and DEVICE == "cpu":
        pytest.skip("the 224-px size is for a GPU (occlude alone writes 14 GB)")
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in inputs(size)[op]]
    reasons = OPS[op].reasons(*args)[backend]
    if reasons or (backend == "triton" and DEVICE == "cpu"):
        pytest.skip(f"{backend}: {'; '.join(reasons) or 'the Triton interpreter is not a benchmark'}")
    benchmark.group = f"{op} {size} {DEVICE}"

    def call():
        RUN[op](*args, backend=backend)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=20 if DEVICE == "cuda" else 5, warmup_rounds=1, iterations=1)
