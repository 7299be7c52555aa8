"""The cluster-masking sweep's ops against their references on every backend that runs here (Triton under
TRITON_INTERPRET=1 on CPU, C++ CPU; CUDA where there is a device), on odd shapes; and the chained sweep against
the reference sweep.

Tolerances: occlude is exact (a copy and a select, in the input's dtype); cluster_drop 1e-5 in fp32 (one dot product
and two norms of up to 64 terms, summed in another order), 1e-4 for bf16 / fp16 features (the same upcast values on
both sides); occlusion_heat 1e-5 (a mean of up to W drops).
"""

import pytest
import torch

from trojanguard.ops import OPS
from trojanguard.ops.cluster_mask import cluster_mask_sweep_reference, sweep_windows, window_drops_reference
from trojanguard.ops.cluster_sweep import (
    cluster_drop,
    cluster_drop_reference,
    occlude,
    occlude_reference,
    occlusion_heat,
    occlusion_heat_reference,
    sweep_drops,
    sweep_heatmaps,
)

FAST = ["triton", "cpp", "cuda"]
SHAPES = [(1, 1, 7, 9, 3, 2), (5, 3, 7, 9, 4, 3), (2, 3, 32, 32, 6, 2), (3, 1, 33, 31, 5, 4),  # N, C, H, W, window,
          (2, 1, 13, 12, 5, 3)]  # stride; the last: an odd height with a width that is a multiple of 4


def _device(backend: str) -> str:
    return "cuda" if backend in ("cuda",) or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _skip_unless_runs(op_name: str, backend: str) -> None:
    reasons = OPS[op_name].availability()[backend]
    if reasons:
        print(f"skipped {op_name} on {backend}: {'; '.join(reasons)}")
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


def _windows(h, w, window, stride):
    boxes = sweep_windows(h, w, window, stride)
    return torch.cat([boxes, torch.tensor([[h - 2, w - 2, 5, 5], [-1, 0, 2, 3]])])  # two reach outside the image


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_occlude_matches_the_reference_exactly(backend, shape, dtype):
    _skip_unless_runs("occlude", backend)
    n, c, h, w, window, stride = shape
    device = _device(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, c, h, w, generator=gen).to(dtype)
    windows, values = _windows(h, w, window, stride), torch.rand(n, c, generator=gen)
    expected = occlude_reference(x, windows, values)
    got = occlude(x.to(device), windows.to(device), values.to(device), backend=backend)
    assert got.dtype == dtype and got.shape == (n * len(windows), c, h, w)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("n, windows, d", [(1, 1, 5), (4, 121, 64), (3, 7, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cluster_drop_matches_the_reference(backend, n, windows, d, dtype):
    _skip_unless_runs("cluster_drop", backend)
    device = _device(backend)
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(n * windows, d, generator=gen).to(dtype)
    centroids, base = torch.randn(n, d, generator=gen), torch.rand(n, generator=gen)
    features[0] = 0  # a zero row: F.normalize's floor, not a division by zero
    expected = cluster_drop_reference(features, centroids, base)
    got = cluster_drop(features.to(device), centroids.to(device), base.to(device), backend=backend)
    assert got.dtype == torch.float32 and got.shape == (n, windows)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(got.cpu(), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_occlusion_heat_matches_the_reference(backend, shape):
    _skip_unless_runs("occlusion_heat", backend)
    n, _, h, w, window, stride = shape
    device = _device(backend)
    windows = _windows(h, w, window, stride)
    drops = torch.randn(n, len(windows), generator=torch.Generator().manual_seed(2))
    expected = occlusion_heat_reference(drops, windows, h, w)
    got = occlusion_heat(drops.to(device), windows.to(device), h, w, backend=backend)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=0)


def test_uncovered_pixels_are_zero_and_bad_boxes_are_refused():
    windows = torch.tensor([[0, 0, 2, 2]])
    heat = occlusion_heat(torch.tensor([[3.0]]), windows, 4, 4, backend="reference")
    assert heat[0, :2, :2].eq(3).all() and heat[0, 2:].eq(0).all()
    reasons = OPS["occlusion_heat"].reasons(torch.tensor([[3.0]]), windows.int(), 4, 4)
    assert any("int64" in r for r in reasons["triton"] + reasons["cpp"])


class _Encoder(torch.nn.Module):
    """A small conv encoder whose features depend on where things are (so every window matters)."""

    def __init__(self, channels: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 * 16, 12)

    def forward(self, x):
        return self.head(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1))


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_the_chained_sweep_matches_the_reference_sweep(backend):
    if backend != "reference":
        for name in ("occlude", "cluster_drop", "occlusion_heat"):
            _skip_unless_runs(name, backend)
    device = _device(backend)
    encoder = _Encoder(3).to(device).eval()
    x = torch.rand(3, 3, 13, 11, generator=torch.Generator().manual_seed(3)).to(device)
    centroids = torch.nn.functional.normalize(torch.randn(3, 12, generator=torch.Generator().manual_seed(4)), dim=1).to(device)
    windows = sweep_windows(13, 11, 4, 3)
    expected = window_drops_reference(encoder, x, centroids, windows, fill="mean", batch_size=20)
    drops = sweep_drops(encoder, x, centroids, windows, fill="mean", batch_size=20, backend=backend)
    torch.testing.assert_close(drops, expected, atol=1e-5, rtol=0)
    heat = sweep_heatmaps(encoder, x, centroids, windows, fill=0.0, backend=backend)
    reference = cluster_mask_sweep_reference(encoder, x, centroids, window=4, stride=3, fill=0.0)
    torch.testing.assert_close(heat, reference, atol=1e-5, rtol=0)


def test_the_sweep_encoder_gives_the_encoders_features_faster_shaped():
    """Conv–BN folded, channels-last, CPU passes sized to the cache budget: the same features (fp32, 1e-4: folding
    reorders the arithmetic), with bf16 close (cosine ≥ 0.99); the user's encoder is left as it was."""
    from trojanguard.ops.cluster_sweep import SweepEncoder
    from trojanguard.ssl.backbones import build_backbone

    torch.manual_seed(0)
    encoder = build_backbone("small_cnn", in_channels=3)
    encoder.train()
    x = torch.rand(70, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = encoder.eval()(x)
    encoder.train()
    prepared = SweepEncoder(encoder, low_precision=False)
    got = prepared(x)
    assert encoder.training and "conv-bn folded" in prepared.steps and "channels_last" in prepared.steps
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert prepared._batch_for[(3, 32, 32)] == 32  # 4 MiB / (32 channels × 32 × 32 × 4 bytes), a power of two
    low = SweepEncoder(encoder, low_precision=True)(x)
    assert torch.nn.functional.cosine_similarity(low, expected).min() > 0.99
    fixed = SweepEncoder(encoder, low_precision=False, forward_batch=7, fold_batchnorm=False, channels_last=False)
    torch.testing.assert_close(fixed(x), expected, atol=1e-5, rtol=1e-5)
    assert "CUDA graphs" not in prepared.steps  # "auto": a GPU only
    with pytest.raises(ValueError, match="cuda_graphs: CUDA graphs need a CUDA device, got cpu"):
        SweepEncoder(encoder, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (none here)")
def test_the_sweep_encoder_replays_a_captured_graph_per_pass_shape():
    """On a GPU a pass shape seen twice is captured once and replayed: each replay gives the features of *its* input
    (the static buffer is refilled) that the same preparation gives without graphs (fp32 and bf16 autocast), and in
    fp32 the encoder's own features."""
    from trojanguard.ops.cluster_sweep import SweepEncoder
    from trojanguard.ssl.backbones import build_backbone

    torch.manual_seed(0)
    encoder = build_backbone("small_cnn", in_channels=3).cuda().eval()
    for low_precision in (False, True):
        prepared = SweepEncoder(encoder, "cuda", low_precision=low_precision)
        eager = SweepEncoder(encoder, "cuda", low_precision=low_precision, cuda_graphs=False)
        assert "CUDA graphs" in prepared.steps and "CUDA graphs" not in eager.steps
        for seed in range(4):
            x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).cuda()
            got = prepared(x)
            torch.testing.assert_close(got, eager(x), atol=1e-3, rtol=1e-3)
            if not low_precision:  # 1e-2: both sides run TF32 convolutions, in another order after folding
                with torch.no_grad():
                    torch.testing.assert_close(got, encoder(x), atol=1e-2, rtol=1e-2)
        assert len(prepared._graphs) == 1 and not prepared.skipped, prepared.skipped


def test_the_sweep_encoder_falls_back_where_a_preparation_changes_the_features():
    """An Encoder wrapper that pools a 4-D map (the traced graph would skip the pooling) keeps it; a module that
    flattens with view() (which channels-last memory breaks) runs without channels-last; both give the encoder's
    features, and nothing is printed."""
    from torch import nn

    from trojanguard.models import as_encoder
    from trojanguard.ops.cluster_sweep import SweepEncoder

    torch.manual_seed(0)
    pooled = as_encoder(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1)).eval())

    class Flattening(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).view(x.size(0), -1)

    x = torch.rand(5, 3, 12, 12)
    for encoder in (pooled, Flattening().eval()):
        prepared = SweepEncoder(encoder, low_precision=False)
        with torch.no_grad():
            torch.testing.assert_close(prepared(x), encoder(x), atol=1e-4, rtol=1e-4)
    assert "conv-bn folded" in SweepEncoder(pooled, low_precision=False).steps
    assert "channels_last" not in prepared.steps and prepared.model is not prepared.encoder
