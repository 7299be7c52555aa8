"""Frequency-shaped invisible triggers: a smooth low-frequency pattern, and FTrojan's block-DCT perturbation."""

from __future__ import annotations

import math

import torch

from trojanguard.attacks._helpers import check_choice, check_int, check_range, seeded
from trojanguard.attacks.base import Attack

# BT.601 RGB → YUV (analogue form), the colour transform FTrojan perturbs in
RGB_TO_YUV = torch.tensor([[0.299, 0.587, 0.114],
                           [-0.14713, -0.28886, 0.436],
                           [0.615, -0.51499, -0.10001]])


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``(n, n)``: row ``u`` is the ``u``-th basis vector, so ``X = D x Dᵀ``."""
    k = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


class LowFrequency(Attack):
    """Add a smooth pattern: seeded noise low-pass filtered in the Fourier domain, scaled to L∞ ``epsilon``.

    After Zeng et al., "Rethinking the backdoor attacks' triggers: a frequency perspective" (ICCV 2021): triggers
    with only low-frequency content are hard to see and escape frequency-artefact detectors. ``cutoff`` keeps the
    frequencies with radius ≤ ``cutoff`` × the Nyquist frequency. Each channel gets its own pattern.
    """

    name = "lowfreq"

    def __init__(self, epsilon: float = 0.1, cutoff: float = 0.15, pattern_seed: int = 0):
        self.epsilon = check_range("epsilon", epsilon, 0, 1, what="an L∞ budget")
        self.cutoff = check_range("cutoff", cutoff, 0, 1, what="a fraction of the Nyquist frequency")
        self.pattern_seed = pattern_seed

    def pattern(self, c: int, h: int, w: int) -> torch.Tensor:
        """The additive trigger ``(c, h, w)``, max |value| = ``epsilon``."""
        noise = torch.randn(c, h, w, generator=seeded(self.pattern_seed))
        spectrum = torch.fft.rfft2(noise)
        fy = torch.fft.fftfreq(h)[:, None] * 2  # in units of Nyquist
        fx = torch.fft.rfftfreq(w)[None, :] * 2
        keep = (fy**2 + fx**2).sqrt() <= self.cutoff
        keep[0, 0] = False  # no constant shift: a pattern, not a brightness change
        smooth = torch.fft.irfft2(spectrum * keep, s=(h, w))
        scale = smooth.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        return self.epsilon * smooth / scale

    def _apply(self, x, gen):
        _, c, h, w = x.shape
        return x + self.pattern(c, h, w)


class FTrojan(Attack):
    """FTrojan (Wang et al., ECCV 2022): raise chosen mid and high DCT coefficients of every ``block`` × ``block``
    block by ``magnitude`` in the U and V channels of YUV (``channels='uv'``) or in Y (``'y'``).

    The DCT and the colour transform are linear and nothing is quantised, so the trigger is a fixed additive
    pattern: we build it once (inverse DCT of the raised coefficients, tiled, mapped back to RGB). Its L∞ norm is
    at most ``magnitude × (2 / block) × len(frequencies)`` times the largest YUV → RGB row weight, see
    :meth:`linf_bound`. Single-channel images are perturbed directly (as Y). ``magnitude`` is on the [0, 1] pixel
    scale (the paper's 30 on the 0–255 scale is 30/255).
    """

    name = "ftrojan"

    def __init__(self, magnitude: float = 30 / 255, block: int = 8,
                 frequencies: tuple[tuple[int, int], ...] = ((4, 4), (7, 7)), channels: str = "uv"):
        self.magnitude = check_range("magnitude", magnitude, 0, 4, what="a DCT coefficient change")
        self.block = check_int("block", block, 2, "a block side")
        freqs = tuple(tuple(f) for f in frequencies)
        if not freqs or any(len(f) != 2 or not all(0 <= int(v) < block for v in f) for f in freqs):
            raise ValueError(f"frequencies: expected (u, v) pairs with 0 ≤ u, v < block={block}, got {frequencies!r}")
        self.frequencies = freqs
        self.channels = check_choice("channels", channels, ("uv", "y"))

    def linf_bound(self) -> float:
        """Upper bound on the trigger's L∞ norm before clamping."""
        columns = [1, 2] if self.channels == "uv" else [0]
        yuv_to_rgb = torch.linalg.inv(RGB_TO_YUV)[:, columns].abs().sum(1).max().item()
        return self.magnitude * (2 / self.block) * len(self.frequencies) * max(1.0, yuv_to_rgb)

    def pattern(self, c: int, h: int, w: int) -> torch.Tensor:
        """The additive trigger ``(c, h, w)``."""
        if h < self.block or w < self.block:
            raise ValueError(f"block: expected at most the image side {min(h, w)}, got {self.block}")
        d = dct_matrix(self.block)
        coeff = torch.zeros(self.block, self.block)
        for u, v in self.frequencies:
            coeff[u, v] += self.magnitude
        tile = d.T @ coeff @ d  # inverse 2-D DCT of the raised coefficients
        reps = (-(-h // self.block), -(-w // self.block))
        plane = tile.repeat(*reps)[:h, :w]
        if c != 3:
            return plane.expand(c, h, w).clone()
        yuv = torch.zeros(3, h, w)
        if self.channels == "uv":
            yuv[1], yuv[2] = plane, plane
        else:
            yuv[0] = plane
        return torch.einsum("ij,jhw->ihw", torch.linalg.inv(RGB_TO_YUV), yuv)

    def _apply(self, x, gen):
        _, c, h, w = x.shape
        return x + self.pattern(c, h, w)
