"""Sample-specific triggers: every image gets its own trigger, computed from the image by a fixed network.

Neither network is trained here: ISSBA's StegaStamp encoder and the input-aware attack's generator are learnt in
the papers; ours are randomly initialised from a seed and then frozen, so the trigger is a deterministic function
of the image (and of the seed), which is the property defences are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trojanguard.attacks._helpers import check_int, check_range, random_conv_net, run_conv_net, seeded
from trojanguard.attacks.base import Attack

CODE_GRID = 8  # side of the grid the secret bit string is spread over before upsampling (StegaStamp-style)
IMAGE_GAIN = 4.0  # weight of the (centred) image at ISSBA's encoder input: the residual follows the image, not only the code


def _code_plane(bits: int, h: int, w: int, seed: int) -> torch.Tensor:
    """A fixed plane ``(1, 1, h, w)``: a seeded bit string mapped by a seeded linear layer to a grid, upsampled."""
    gen = seeded(seed)
    code = torch.randint(0, 2, (bits,), generator=gen).float() * 2 - 1
    dense = torch.randn(CODE_GRID * CODE_GRID, bits, generator=gen) / bits**0.5
    grid = (dense @ code).view(1, 1, CODE_GRID, CODE_GRID)
    return F.interpolate(grid, size=(h, w), mode="nearest")


class ISSBA(Attack):
    """ISSBA-like invisible sample-specific noise (Li et al., ICCV 2021): ``x + epsilon · r(x) / max|r(x)|``.

    ``r`` is a fixed encoder: the image (centred, weighted by ``IMAGE_GAIN``) and a code plane (a seeded ``code_bits`` string spread over the
    image, as StegaStamp feeds its secret) go through a seeded random 3-layer conv net of width ``hidden``. The
    residual differs from image to image, and its L∞ norm is ``epsilon`` (before clamping to [0, 1]). ISSBA's
    encoder is trained to hide the string recoverably; ours is not trained.
    """

    name = "issba"

    def __init__(self, epsilon: float = 0.05, code_bits: int = 32, hidden: int = 16, encoder_seed: int = 0):
        self.epsilon = check_range("epsilon", epsilon, 0, 1, what="an L∞ budget")
        self.code_bits = check_int("code_bits", code_bits, 1, "a number of bits")
        self.hidden = check_int("hidden", hidden, 1, "a number of channels")
        self.encoder_seed = encoder_seed

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The per-image residual ``(N, C, H, W)``, each with max |value| = ``epsilon``."""
        n, c, h, w = x.shape
        layers = random_conv_net([c + 1, self.hidden, self.hidden, c], self.encoder_seed)
        code = _code_plane(self.code_bits, h, w, self.encoder_seed + 1).expand(n, 1, h, w)
        r = run_conv_net(layers, torch.cat([IMAGE_GAIN * (x - 0.5), code], dim=1))
        return self.epsilon * r / r.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)

    def _apply(self, x, gen):
        return x + self.residual(x)


class InputAware(Attack):
    """Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): ``x' = (1 − m(x))·x + m(x)·p(x)``.

    A fixed, seeded, randomly initialised conv generator (width ``hidden``) reads the image and a fixed seeded
    noise plane (so flat backgrounds still get varied output) and returns a colour pattern ``p(x)`` and mask logits;
    the mask keeps the ``mask_density`` share of pixels with the highest logits. The paper trains the generator
    jointly with the classifier (diversity loss, mask-norm loss); ours is not trained. Cross-trigger mode:
    ``cross_ratio`` × the poisoned count further samples get the trigger computed from another image and keep
    their true labels, so a trigger works only on the image it was made for.
    """

    name = "input_aware"

    def __init__(self, mask_density: float = 0.05, cross_ratio: float = 1.0, hidden: int = 16,
                 generator_seed: int = 0):
        self.mask_density = check_range("mask_density", mask_density, 0, 1, what="a share of the pixels")
        self.cross_ratio = check_range("cross_ratio", cross_ratio, 0, 10, low_open=False,
                                       what="cross-trigger samples per poisoned sample")
        self.hidden = check_int("hidden", hidden, 1, "a number of channels")
        self.generator_seed = generator_seed

    def generate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pattern ``(N, C, H, W)`` in (0, 1), mask ``(N, 1, H, W)`` of 0/1) made from ``x``."""
        n, c, h, w = x.shape
        layers = random_conv_net([c + 1, self.hidden, self.hidden, c + 1], self.generator_seed)
        noise = torch.randn(1, 1, h, w, generator=seeded(self.generator_seed + 1)).expand(n, 1, h, w)
        out = run_conv_net(layers, torch.cat([2 * x - 1, noise], dim=1))
        raw = out[:, :c]
        pattern = torch.sigmoid(3 * (raw - raw.mean(dim=(1, 2, 3), keepdim=True))
                                / raw.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12))
        logits = out[:, c:].flatten(1)
        k = max(1, round(self.mask_density * h * w))
        mask = torch.zeros_like(logits).scatter_(1, logits.topk(k, dim=1).indices, 1.0).view(n, 1, h, w)
        return pattern, mask

    def _apply(self, x, gen):
        pattern, mask = self.generate(x)
        return (1 - mask) * x + mask * pattern

    def _poison_extra(self, x, y, chosen, gen):
        """Cross-trigger samples: the trigger of another (random) image, true labels kept."""
        taken = torch.zeros(len(x), dtype=torch.bool)
        taken[chosen] = True
        free = (~taken).nonzero().flatten()
        count = min(len(free), round(self.cross_ratio * len(chosen)))
        cross = free[torch.randperm(len(free), generator=gen)[:count]]
        if count:
            donors = free[torch.randint(0, len(free), (count,), generator=gen)]
            same = donors == cross
            donors[same] = free[(torch.searchsorted(free, donors[same]) + 1) % len(free)]
            pattern, mask = self.generate(x[donors])
            x[cross] = ((1 - mask) * x[cross] + mask * pattern).clamp(0, 1)
        return cross.sort().values
