"""SimCLR's two-view augmentation, per sample, on image tensors (torchvision.transforms.v2).

torchvision's v2 transforms draw one set of random parameters per call, so a batch is transformed image by
image (at 32 px this costs about as much as a small CNN's step). The random draws come from a seed taken from
the caller's generator, so a run is reproducible whatever else uses torch's global generator meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CROP_SCALE = (0.3, 1.0)  # area fraction of SimCLR's random resized crop (the paper: 0.08–1 at 224 px;
#                                  small images keep more, or a crop holds too little of a digit)


@dataclass(frozen=True)
class SimCLRAugmentation:
    """Random resized crop, optional horizontal flip, colour jitter (applied with ``jitter_p``) and random
    grayscale, each image with its own draws. ``x: (B, C, H, W)`` in [0, 1] -> ``(B, C, image_size, image_size)``.

    ``flip`` only where the domain allows it (digits: a mirrored digit is another shape, so off by default).
    Hue jitter is off by default: digits carry no hue, and torchvision's hue shift is the slowest part by far.
    """

    image_size: int = 32
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE
    flip: bool = False
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0
    jitter_p: float = 0.8
    grayscale_p: float = 0.2

    def __post_init__(self):
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale: expected 0 < low <= high <= 1, got {self.crop_scale}")
        for name in ("jitter_p", "grayscale_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {getattr(self, name)}")

    def transform(self):
        """The torchvision v2 pipeline for one image ``(C, H, W)``."""
        from torchvision.transforms import v2

        steps = [v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, antialias=True)]
        if self.flip:
            steps.append(v2.RandomHorizontalFlip())
        if self.jitter_p > 0 and any((self.brightness, self.contrast, self.saturation, self.hue)):
            jitter = v2.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue)
            steps.append(v2.RandomApply([jitter], p=self.jitter_p))
        if self.grayscale_p > 0:
            steps.append(v2.RandomGrayscale(self.grayscale_p))
        return v2.Compose(steps)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One augmented view of each image of ``x``; the same ``generator`` state gives the same views."""
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        transform = self.transform()
        with torch.random.fork_rng(devices=[]):  # v2 draws on the CPU's global generator: seed it, then restore
            torch.manual_seed(seed)
            views = [transform(image) for image in x]
        return torch.stack(views).clamp_(0, 1)
