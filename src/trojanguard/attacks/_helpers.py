"""Small pieces shared by the attack families: argument checks, seeded patterns, cover samples, convolutions."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool = True,
                high_open: bool = False, what: str = "a value") -> float:
    """Raise ``ValueError`` naming ``name`` unless ``value`` lies in the interval (brackets as given)."""
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (isinstance(value, (int, float)) and ok_low and ok_high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected {what} in {interval}, got {value!r}")
    return float(value)


def check_int(name: str, value: int, low: int, what: str = "an integer") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected {what} ≥ {low}, got {value!r}")
    return value


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x: (N, C, H, W)`` with reflect padding (identity for sigma 0)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    pad_h, pad_w = min(radius, x.shape[2] - 1), min(radius, x.shape[3] - 1)
    y = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect" if pad_w else "replicate")
    k = kernel[radius - pad_w : radius + pad_w + 1]
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    y = F.pad(y, (0, 0, pad_h, pad_h), mode="reflect" if pad_h else "replicate")
    k = kernel[radius - pad_h : radius + pad_h + 1]
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def random_conv_net(channels: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Weights of a fixed, randomly initialised 3×3 conv stack ``channels[0] → … → channels[-1]`` (He init, seeded)."""
    gen = seeded(seed)
    layers = []
    for c_in, c_out in itertools.pairwise(channels):
        weight = torch.randn(c_out, c_in, 3, 3, generator=gen) * math.sqrt(2 / (9 * c_in))
        bias = torch.randn(c_out, generator=gen) * 0.1
        layers.append((weight, bias))
    return layers


def run_conv_net(layers: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """Forward of :func:`random_conv_net`: conv → ReLU between layers, linear output."""
    for i, (weight, bias) in enumerate(layers):
        x = F.conv2d(x, weight, bias, padding=1)
        if i < len(layers) - 1:
            x = F.relu(x)
    return x


def add_cover_samples(x: torch.Tensor, chosen: torch.Tensor, ratio: float, gen: torch.Generator,
                      trigger: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> torch.Tensor:
    """Trigger ``round(ratio · len(chosen))`` further samples in place, keeping their true labels.

    Cover ("conservatism") samples, as in the adaptive attacks of Qi et al. (ICLR 2023): samples that carry the
    training-time trigger but keep their label, so poison and clean samples stay close in latent space. They are
    drawn from the samples not poisoned (any class). Returns their indices.
    """
    taken = torch.zeros(len(x), dtype=torch.bool)
    taken[chosen] = True
    free = (~taken).nonzero().flatten()
    count = min(len(free), round(ratio * len(chosen)))
    cover = free[torch.randperm(len(free), generator=gen)[:count]].sort().values
    if count:
        x[cover] = trigger(x[cover], gen).clamp(0, 1)
    return cover
