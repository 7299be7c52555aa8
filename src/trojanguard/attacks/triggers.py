"""The five attacks of the zoo: BadNets, Blended, SIG, WaNet and a Trojan-style watermark."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trojanguard.attacks.base import Attack


def _pattern(kind: str, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """A trigger pattern ``(c, h, w)`` in [0, 1]: 'white', 'checkerboard' or 'random' (seeded)."""
    if kind == "white":
        return torch.ones(c, h, w)
    if kind == "checkerboard":
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return ((ii + jj) % 2 == 0).float().expand(c, h, w).clone()
    if kind == "random":
        return torch.rand(c, h, w, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"pattern: expected 'white', 'checkerboard' or 'random', got {kind!r}")


class BadNets(Attack):
    """Stamp a small patch (Gu et al. 2017). ``size`` as a fraction of the side, ``position`` a corner."""

    name = "badnets"

    def __init__(self, size: float = 0.125, position: str = "bottom-right", pattern: str = "checkerboard",
                 pattern_seed: int = 0):
        if not 0 < size < 1:
            raise ValueError(f"size: expected a fraction of the image side in (0, 1), got {size}")
        if position not in ("bottom-right", "bottom-left", "top-right", "top-left", "random"):
            raise ValueError(f"position: expected a corner or 'random', got {position!r}")
        self.size, self.position, self.pattern, self.pattern_seed = size, position, pattern, pattern_seed

    def _apply(self, x, gen):
        n, c, h, w = x.shape
        ph, pw = max(1, round(h * self.size)), max(1, round(w * self.size))
        patch = _pattern(self.pattern, c, ph, pw, self.pattern_seed)
        margin = 1 if h > 8 else 0
        out = x.clone()
        for i in range(n):
            pos = self.position
            if pos == "random":
                top = int(torch.randint(0, h - ph + 1, (), generator=gen))
                left = int(torch.randint(0, w - pw + 1, (), generator=gen))
            else:
                top = margin if pos.startswith("top") else h - ph - margin
                left = margin if pos.endswith("left") else w - pw - margin
            out[i, :, top : top + ph, left : left + pw] = patch
        return out


class Blended(Attack):
    """Blend a global pattern into the whole image: ``(1 − α)·x + α·pattern`` (Chen et al. 2017)."""

    name = "blended"

    def __init__(self, alpha: float = 0.2, pattern_seed: int = 0):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha: expected a blend weight in (0, 1), got {alpha}")
        self.alpha, self.pattern_seed = alpha, pattern_seed

    def _apply(self, x, gen):
        _, c, h, w = x.shape
        pattern = _pattern("random", c, h, w, self.pattern_seed)
        return (1 - self.alpha) * x + self.alpha * pattern


class SIG(Attack):
    """Add a horizontal sinusoid ``Δ·sin(2π·j·f/W)`` (Barni et al. 2019); clean-label poisoning."""

    name = "sig"
    clean_label = True

    def __init__(self, delta: float = 20 / 255, frequency: float = 6, test_delta: float | None = None):
        if delta <= 0:
            raise ValueError(f"delta: expected a positive amplitude, got {delta}")
        self.delta, self.frequency = delta, frequency
        self.test_delta = test_delta

    def signal(self, c: int, h: int, w: int, delta: float) -> torch.Tensor:
        j = torch.arange(w, dtype=torch.float32)
        return (delta * torch.sin(2 * math.pi * j * self.frequency / w)).expand(c, h, w)

    def _apply(self, x, gen):
        _, c, h, w = x.shape
        return x + self.signal(c, h, w, self.delta)

    def apply_test(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Trigger for evaluation: the SIG paper uses a stronger amplitude at test time when given."""
        if self.test_delta is None:
            return self.apply(x, seed)
        _, c, h, w = x.shape
        return (x + self.signal(c, h, w, self.test_delta)).clamp(0, 1)


class WaNet(Attack):
    """Warp the image with a fixed smooth random field (Nguyen & Tran 2021).

    ``k``: control-grid size, ``strength``: warp amplitude ``s``; ``noise_ratio`` adds samples warped by
    the field plus random noise that keep their true labels (noise mode), so the model learns the exact warp.
    """

    name = "wanet"

    def __init__(self, k: int = 4, strength: float = 0.5, noise_ratio: float = 2.0, grid_seed: int = 0):
        if k < 2:
            raise ValueError(f"k: expected a control grid of at least 2, got {k}")
        self.k, self.strength, self.noise_ratio, self.grid_seed = k, strength, noise_ratio, grid_seed

    def _grid(self, h: int, w: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.grid_seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=gen) * 2 - 1
        ins = ins / ins.abs().mean()
        noise_grid = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=2)[None]
        grid = identity + self.strength * noise_grid / h
        return grid.clamp(-1, 1)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), align_corners=True)

    def _apply(self, x, gen):
        return self._warp(x, self._grid(x.shape[2], x.shape[3]))

    def _poison_extra(self, x, y, chosen, gen):
        """Noise mode: warp further clean samples with grid + random noise, keeping their labels."""
        if self.noise_ratio <= 0:
            return None
        n, _, h, w = x.shape
        taken = torch.zeros(n, dtype=torch.bool)
        taken[chosen] = True
        free = (~taken).nonzero().flatten()
        n_noise = min(len(free), round(self.noise_ratio * len(chosen)))
        noisy = free[torch.randperm(len(free), generator=gen)[:n_noise]]
        grid = self._grid(h, w).expand(n_noise, -1, -1, -1)
        grid = (grid + (torch.rand(n_noise, h, w, 2, generator=gen) * 2 - 1) / h).clamp(-1, 1)
        x[noisy] = F.grid_sample(x[noisy], grid, align_corners=True).clamp(0, 1)
        return noisy.sort().values


class Trojan(Attack):
    """Trojan-style watermark: a fixed random mask-shaped pattern blended at a corner (Liu et al. 2018).

    The trigger is a seeded random shape covering ``size`` of the side, applied with opacity ``alpha``.
    """

    name = "trojan"

    def __init__(self, size: float = 0.25, alpha: float = 1.0, pattern_seed: int = 1):
        if not 0 < size < 1:
            raise ValueError(f"size: expected a fraction of the image side in (0, 1), got {size}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha: expected an opacity in (0, 1], got {alpha}")
        self.size, self.alpha, self.pattern_seed = size, alpha, pattern_seed

    def watermark(self, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask (1, h, w), pattern (c, h, w)): a random blob of ~half the corner square, coloured."""
        gen = torch.Generator().manual_seed(self.pattern_seed)
        ph, pw = max(2, round(h * self.size)), max(2, round(w * self.size))
        blob = F.interpolate(torch.rand(1, 1, 3, 3, generator=gen), size=(ph, pw), mode="bilinear",
                             align_corners=True)[0]
        shape = (blob > blob.median()).float()
        mask = torch.zeros(1, h, w)
        mask[:, :ph, w - pw :] = shape
        colour = torch.rand(c, 1, 1, generator=gen) * 0.5 + 0.5
        return mask * self.alpha, colour.expand(c, h, w)

    def _apply(self, x, gen):
        _, c, h, w = x.shape
        mask, pattern = self.watermark(c, h, w)
        return (1 - mask) * x + mask * pattern
