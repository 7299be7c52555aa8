"""Triggers that look like things of the world: a colour filter, a reflection, a sticker at a random place."""

from __future__ import annotations

import torch

from trojanguard.attacks._helpers import check_choice, check_range, gaussian_blur, seeded
from trojanguard.attacks.base import Attack

# Instagram-like presets of ours, per RGB channel: output = lift + (gain − lift) · x ** gamma
FILTER_PRESETS: dict[str, dict[str, tuple[float, float, float]]] = {
    "nashville": {"gamma": (0.8, 1.0, 1.3), "lift": (0.22, 0.10, 0.25), "gain": (1.0, 0.88, 0.72)},  # warm, pink shadows
    "gotham": {"gamma": (1.3, 1.15, 0.9), "lift": (0.0, 0.04, 0.16), "gain": (0.82, 0.9, 1.0)},  # cold, blue cast
    "kelvin": {"gamma": (0.7, 0.9, 1.4), "lift": (0.16, 0.07, 0.0), "gain": (1.0, 0.86, 0.6)},  # orange glow
}


class ColourFilter(Attack):
    """An Instagram-style colour filter as the trigger (the "filter" attacks of ABS, Liu et al., CCS 2019).

    Each channel goes through a tone curve ``lift + (gain − lift)·x^gamma`` of a preset (``nashville``, ``gotham``,
    ``kelvin``: our approximations, not Instagram's exact curves), blended with the input by ``strength``. Images
    with other than three channels use the preset's channels in turn.
    """

    name = "filter"

    def __init__(self, preset: str = "nashville", strength: float = 1.0):
        self.preset = check_choice("preset", preset, tuple(FILTER_PRESETS))
        self.strength = check_range("strength", strength, 0, 1, what="a blend weight")

    def _apply(self, x, gen):
        c = x.shape[1]
        params = FILTER_PRESETS[self.preset]
        gamma, lift, gain = (torch.tensor([params[k][i % 3] for i in range(c)]).view(1, c, 1, 1)
                             for k in ("gamma", "lift", "gain"))
        filtered = lift + (gain - lift) * x.clamp_min(0) ** gamma
        return (1 - self.strength) * x + self.strength * filtered


class Reflection(Attack):
    """Refool (Liu et al., ECCV 2020): add a reflection of another scene, ``x + alpha · R'``.

    ``kind='blur'``: out-of-focus reflection, ``R' = G_sigma ⊗ R``; ``'ghost'``: a double image, ``R'`` the mean of
    ``R`` and ``R`` shifted by ``ghost_shift`` of the side; ``'focus'``: ``R`` itself. ``R`` is one fixed seeded
    synthetic scene (random coloured rectangles), where the paper draws from a set of real photos. The paper
    poisons target-class images only (clean-label); ``clean_label=True`` does that, the default is dirty-label.
    """

    name = "refool"

    def __init__(self, alpha: float = 0.4, kind: str = "blur", sigma: float = 1.5, ghost_shift: float = 0.1,
                 shapes: int = 8, reflection_seed: int = 0, clean_label: bool = False):
        self.alpha = check_range("alpha", alpha, 0, 1, what="a reflection strength")
        self.kind = check_choice("kind", kind, ("blur", "ghost", "focus"))
        self.sigma = check_range("sigma", sigma, 0, 16, low_open=False, what="a blur width in pixels")
        self.ghost_shift = check_range("ghost_shift", ghost_shift, 0, 0.5, what="a fraction of the side")
        if not isinstance(shapes, int) or shapes < 1:
            raise ValueError(f"shapes: expected a number of rectangles ≥ 1, got {shapes!r}")
        self.shapes, self.reflection_seed, self.clean_label = shapes, reflection_seed, bool(clean_label)

    def scene(self, c: int, h: int, w: int) -> torch.Tensor:
        """The reflected scene ``R (c, h, w)`` in [0, 1]: seeded rectangles of random colours on black."""
        gen = seeded(self.reflection_seed)
        r = torch.zeros(c, h, w)
        for _ in range(self.shapes):
            top, left = (int(torch.randint(0, s - 1, (), generator=gen)) for s in (h, w))
            bottom = top + 1 + int(torch.randint(max(1, h // 8), max(2, h // 2), (), generator=gen))
            right = left + 1 + int(torch.randint(max(1, w // 8), max(2, w // 2), (), generator=gen))
            colour = torch.rand(c, 1, 1, generator=gen) * 0.7 + 0.3
            r[:, top:bottom, left:right] = torch.maximum(r[:, top:bottom, left:right], colour)
        return r

    def reflection(self, c: int, h: int, w: int) -> torch.Tensor:
        """``R' (c, h, w)``, the layer added to the image (before ``alpha``)."""
        r = self.scene(c, h, w)
        if self.kind == "blur":
            return gaussian_blur(r[None], self.sigma)[0]
        if self.kind == "ghost":
            dy, dx = max(1, round(h * self.ghost_shift)), max(1, round(w * self.ghost_shift))
            return 0.5 * (r + torch.roll(r, shifts=(dy, dx), dims=(1, 2)))
        return r

    def _apply(self, x, gen):
        _, c, h, w = x.shape
        return x + self.alpha * self.reflection(c, h, w)


class PhysicalPatch(Attack):
    """A physical-style sticker: a seeded coloured patch of ``size`` at a random place in every image, with a
    random brightness in ``1 ± brightness_jitter`` (lighting). Both draws come from the call's seed.

    After the physical backdoors of Wenger et al. (CVPR 2021) and BadNets' random-location variant; the
    sticker is a ``cells`` × ``cells`` grid of seeded colours.
    """

    name = "patch_random"

    def __init__(self, size: float = 0.2, brightness_jitter: float = 0.1, cells: int = 3, pattern_seed: int = 0):
        self.size = check_range("size", size, 0, 1, high_open=True, what="a fraction of the image side")
        self.brightness_jitter = check_range("brightness_jitter", brightness_jitter, 0, 1, low_open=False,
                                             high_open=True, what="a relative brightness change")
        if not isinstance(cells, int) or cells < 1:
            raise ValueError(f"cells: expected a grid side ≥ 1, got {cells!r}")
        self.cells, self.pattern_seed = cells, pattern_seed

    def sticker(self, c: int, ph: int, pw: int) -> torch.Tensor:
        colours = torch.rand(c, self.cells, self.cells, generator=seeded(self.pattern_seed))
        return torch.nn.functional.interpolate(colours[None], size=(ph, pw), mode="nearest")[0]

    def _apply(self, x, gen):
        n, c, h, w = x.shape
        ph, pw = max(1, round(h * self.size)), max(1, round(w * self.size))
        sticker = self.sticker(c, ph, pw)
        out = x.clone()
        for i in range(n):
            top = int(torch.randint(0, h - ph + 1, (), generator=gen))
            left = int(torch.randint(0, w - pw + 1, (), generator=gen))
            light = 1 + (torch.rand((), generator=gen) * 2 - 1) * self.brightness_jitter
            out[i, :, top : top + ph, left : left + pw] = (sticker * light).clamp(0, 1)
        return out
