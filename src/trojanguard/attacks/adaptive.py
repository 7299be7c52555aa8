"""Adaptive attacks that suppress latent separability: Adap-Blend and Adap-Patch (Qi et al., ICLR 2023).

"Revisiting the assumption of latent separability for backdoor defenses": poisoned samples carry only part of
the trigger at low strength, and cover samples (the same partial triggers, true labels kept) stop the model from
turning the trigger into a separate cluster of the target class. At test time the full trigger is applied at a
higher strength (``apply_test``), as in the paper. Triggers are seeded random patterns of ours, not the paper's
images (Hello Kitty, Firefox and Phoenix logos).
"""

from __future__ import annotations

import torch

from trojanguard.attacks._helpers import add_cover_samples, check_int, check_range, seeded
from trojanguard.attacks.base import Attack
from trojanguard.data.core import check_images


class AdaptiveBlend(Attack):
    """Adap-Blend: a blended pattern split into ``pieces`` grid cells; each poisoned sample gets a random
    ``piece_rate`` share of the cells at opacity ``alpha``; test inputs get the whole pattern at ``test_alpha``.

    ``cover_ratio``: cover samples per poisoned sample (the paper's conservatism ratio), triggered the same way but
    labelled with their true class. ``pieces`` must be a square (4 × 4 = 16 in the paper).
    """

    name = "adaptive_blend"

    def __init__(self, alpha: float = 0.15, test_alpha: float = 0.2, pieces: int = 16, piece_rate: float = 0.5,
                 cover_ratio: float = 1.0, pattern_seed: int = 0):
        self.alpha = check_range("alpha", alpha, 0, 1, what="a blend opacity")
        self.test_alpha = check_range("test_alpha", test_alpha, 0, 1, what="a blend opacity")
        check_int("pieces", pieces, 1, "a square number of grid cells")
        if round(pieces**0.5) ** 2 != pieces:
            raise ValueError(f"pieces: expected a square number of grid cells (4, 9, 16, …), got {pieces}")
        self.pieces = pieces
        self.piece_rate = check_range("piece_rate", piece_rate, 0, 1, what="a fraction of the pieces")
        self.cover_ratio = check_range("cover_ratio", cover_ratio, 0, 10, low_open=False,
                                       what="cover samples per poisoned sample")
        self.pattern_seed = pattern_seed

    def pattern(self, c: int, h: int, w: int) -> torch.Tensor:
        """The full trigger ``(c, h, w)`` in [0, 1] (seeded uniform noise)."""
        return torch.rand(c, h, w, generator=seeded(self.pattern_seed))

    def piece_masks(self, h: int, w: int) -> torch.Tensor:
        """``(pieces, h, w)`` 0/1 masks of the grid cells, covering the image once."""
        k = round(self.pieces**0.5)
        rows = torch.arange(h) * k // h
        cols = torch.arange(w) * k // w
        cell = rows[:, None] * k + cols[None, :]
        return (cell[None] == torch.arange(self.pieces)[:, None, None]).float()

    def _apply(self, x, gen):
        n, c, h, w = x.shape
        masks = self.piece_masks(h, w)
        keep = max(1, round(self.piece_rate * self.pieces))
        picks = torch.stack([torch.randperm(self.pieces, generator=gen)[:keep] for _ in range(n)]) if n else \
            torch.zeros(0, keep, dtype=torch.long)
        mask = masks[picks].sum(1, keepdim=True)  # (n, 1, h, w)
        return x + self.alpha * mask * (self.pattern(c, h, w) - x)

    def apply_test(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """The whole pattern at ``test_alpha`` (the paper tests with the full trigger at a higher opacity)."""
        check_images(x, "x")
        _, c, h, w = x.shape
        return ((1 - self.test_alpha) * x + self.test_alpha * self.pattern(c, h, w)).clamp(0, 1)

    def _poison_extra(self, x, y, chosen, gen):
        return add_cover_samples(x, chosen, self.cover_ratio, gen, self._apply)


class AdaptivePatch(Attack):
    """Adap-Patch: ``patches`` small seeded patches at fixed seeded places; each poisoned sample gets a random
    ``patches_per_sample`` of them at opacity ``alpha``; test inputs get all of them at ``test_alpha``.

    ``size``: patch side as a fraction of the image side; ``cover_ratio``: cover samples (true labels kept) per
    poisoned sample.
    """

    name = "adaptive_patch"

    def __init__(self, patches: int = 4, patches_per_sample: int = 2, size: float = 0.15, alpha: float = 0.5,
                 test_alpha: float = 1.0, cover_ratio: float = 1.0, pattern_seed: int = 0):
        self.patches = check_int("patches", patches, 1, "a number of patches")
        self.patches_per_sample = check_int("patches_per_sample", patches_per_sample, 1, "a number of patches")
        if patches_per_sample > patches:
            raise ValueError(f"patches_per_sample: expected at most patches={patches}, got {patches_per_sample}")
        self.size = check_range("size", size, 0, 0.5, high_open=True, what="a fraction of the image side")
        self.alpha = check_range("alpha", alpha, 0, 1, what="an opacity")
        self.test_alpha = check_range("test_alpha", test_alpha, 0, 1, what="an opacity")
        self.cover_ratio = check_range("cover_ratio", cover_ratio, 0, 10, low_open=False,
                                       what="cover samples per poisoned sample")
        self.pattern_seed = pattern_seed

    def layout(self, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(masks ``(patches, 1, h, w)``, pattern ``(c, h, w)``): where each patch sits, and the colours.

        Patch ``i`` sits at a seeded place inside cell ``i`` of a grid over the image, so patches do not overlap.
        """
        gen = seeded(self.pattern_seed)
        ph, pw = max(2, round(h * self.size)), max(2, round(w * self.size))
        k = max(2, int((self.patches - 1) ** 0.5) + 1)
        masks = torch.zeros(self.patches, 1, h, w)
        pattern = torch.zeros(c, h, w)
        for i in range(self.patches):
            r, q = divmod(i, k)
            top0, left0 = r * h // k, q * w // k
            top = top0 + int(torch.randint(0, max(1, h // k - ph + 1), (), generator=gen))
            left = left0 + int(torch.randint(0, max(1, w // k - pw + 1), (), generator=gen))
            top, left = min(top, h - ph), min(left, w - pw)
            masks[i, :, top : top + ph, left : left + pw] = 1
            cells = (torch.rand(c, 2, 2, generator=gen) > 0.5).float()
            pattern[:, top : top + ph, left : left + pw] = cells.repeat_interleave((ph + 1) // 2, 1)[:, :ph] \
                .repeat_interleave((pw + 1) // 2, 2)[:, :, :pw]
        return masks, pattern

    def _apply(self, x, gen):
        n, c, h, w = x.shape
        masks, pattern = self.layout(c, h, w)
        picks = [torch.randperm(self.patches, generator=gen)[: self.patches_per_sample] for _ in range(n)]
        mask = torch.stack([masks[p].amax(0) for p in picks]) if n else torch.zeros(0, 1, h, w)
        return x + self.alpha * mask * (pattern - x)

    def apply_test(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Every patch at ``test_alpha``."""
        check_images(x, "x")
        _, c, h, w = x.shape
        masks, pattern = self.layout(c, h, w)
        mask = masks.amax(0)
        return (x + self.test_alpha * mask * (pattern - x)).clamp(0, 1)

    def _poison_extra(self, x, y, chosen, gen):
        return add_cover_samples(x, chosen, self.cover_ratio, gen, self._apply)
