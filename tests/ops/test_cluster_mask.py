"""The cluster-masking sweep's reference (ops/cluster_mask.py) against a brute-force loop over windows and pixels,
and its window geometry."""

import pytest
import torch
import torch.nn.functional as F

from trojanguard.ops.cluster_mask import (
    box_masks,
    cluster_mask_sweep_reference,
    fill_values,
    scatter_mean,
    sweep_windows,
    window_starts,
)

TOLERANCE = 1e-5  # float32 cosines of the same forward passes, summed in another order


def test_window_starts_end_flush_with_the_border():
    assert window_starts(16, 6, 3) == [0, 3, 6, 9, 10]  # 12 would overrun: one more, flush at 10
    assert window_starts(16, 4, 4) == [0, 4, 8, 12]  # the stride lands on the border: nothing added
    assert window_starts(5, 5, 2) == [0]
    assert sweep_windows(16, 12, 6, 3).shape == (5 * 3, 4)  # columns: 0, 3, 6
    for bad in ((16, 0, 1), (16, 17, 1), (16, 4, 0)):
        with pytest.raises(ValueError, match="window|stride"):
            window_starts(*bad)


def test_box_masks_and_fill_values():
    masks = box_masks(torch.tensor([[1, 2, 2, 3]]), 5, 6)
    assert masks.sum() == 6 and masks[0, 1:3, 2:5].all()
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(fill_values(x, "mean")[:, :, 0, 0], x.mean(dim=(2, 3)))
    assert (fill_values(x, 0.25) == 0.25).all()
    for bad in ("median", 1.5):
        with pytest.raises(ValueError, match="fill"):
            fill_values(x, bad)


def test_scatter_mean_is_the_mean_over_covering_windows():
    windows = sweep_windows(7, 7, 3, 2)
    masks = box_masks(windows, 7, 7)
    drops = torch.randn(2, len(windows))
    heat = scatter_mean(drops, masks)
    for i in range(2):
        for r in range(7):
            for c in range(7):
                covering = [n for n, (t, l, h, w) in enumerate(windows.tolist()) if t <= r < t + h and l <= c < l + w]
                assert heat[i, r, c] == pytest.approx(float(drops[i, covering].mean()), abs=TOLERANCE)


class LinearEncoder(torch.nn.Module):
    """Features = a fixed random projection of the pixels (deterministic, every pixel matters)."""

    def __init__(self, pixels: int, dim: int = 16):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(pixels, dim, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.tanh(x.flatten(1) @ self.weight)


@pytest.mark.parametrize("fill", ["mean", 0.0])
def test_sweep_matches_a_window_by_window_loop(fill):
    torch.manual_seed(1)
    x = torch.rand(3, 2, 8, 9)
    encoder = LinearEncoder(2 * 8 * 9)
    centroids = F.normalize(torch.randn(3, 16), dim=1)
    heat = cluster_mask_sweep_reference(encoder, x, centroids, window=4, stride=3, fill=fill, batch_size=7)
    windows = sweep_windows(8, 9, 4, 3).tolist()
    for i in range(3):
        base = F.cosine_similarity(encoder(x[i : i + 1]), centroids[i : i + 1])
        total, count = torch.zeros(8, 9), torch.zeros(8, 9)
        for t, l, h, w in windows:
            masked = x[i : i + 1].clone()
            value = x[i].mean(dim=(1, 2))[:, None, None] if fill == "mean" else fill
            masked[0, :, t : t + h, l : l + w] = value
            drop = base - F.cosine_similarity(encoder(masked), centroids[i : i + 1])
            total[t : t + h, l : l + w] += drop
            count[t : t + h, l : l + w] += 1
        assert torch.allclose(heat[i], total / count, atol=TOLERANCE)


def test_heat_is_zero_where_no_covering_window_touches_what_the_encoder_sees():
    class CornerEncoder(torch.nn.Module):  # looks only at rows 0-1, columns 0-1
        def forward(self, x):
            corner = x[:, :, :2, :2].flatten(1)
            return torch.cat([corner, torch.ones(len(x), 1)], 1)

    x = torch.rand(2, 1, 10, 10)
    heat = cluster_mask_sweep_reference(CornerEncoder(), x, F.normalize(torch.rand(2, 5), dim=1), window=3, stride=1)
    assert heat[:, 5:, :].abs().max() == 0 and heat[:, :, 5:].abs().max() == 0  # every window covering these misses it
    assert heat[:, :2, :2].abs().sum() > 0
