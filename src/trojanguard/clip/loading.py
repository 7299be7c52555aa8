"""Image–text architectures and tokenizers by name, for the command line and model files:

* ``tiny_clip`` — the zoo's :class:`~trojanguard.clip.TinyCLIP` with the digits' word tokenizer;
* ``open_clip:<name>`` — an open_clip model built with random weights (``pretrained=None``: nothing is downloaded;
  the weights come from the user's file) and ``open_clip.get_tokenizer(<name>)`` (the optional ``clip`` extra). Its
  image tower normalises [0, 1] pixels itself (the model's mean / std, as open_clip's preprocessing would), so it
  takes images as every trojanguard model does; its weights and state-dict keys are open_clip's.
"""

from __future__ import annotations

import torch
from torch import nn

from trojanguard.errors import DataError

TINY_CLIP = "tiny_clip"
OPEN_CLIP_PREFIX = "open_clip:"


def is_image_text_arch(arch: str | None) -> bool:
    return arch is not None and (arch == TINY_CLIP or arch.startswith(OPEN_CLIP_PREFIX))


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise DataError("arch: open_clip models need the open_clip package (pip install 'trojanguard[clip]' or "
                        "pip install open_clip_torch); it is not installed") from None
    return open_clip


def normalise_inside(tower: nn.Module, mean, std) -> None:
    """Make ``tower`` take [0, 1] pixels: a forward pre-hook subtracts ``mean`` and divides by ``std`` per channel
    (no parameter or state-dict key is added)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def normalise(_module, args):
        x = args[0]
        return ((x - mean_t.to(x.device, x.dtype)) / std_t.to(x.device, x.dtype), *args[1:])

    tower.register_forward_pre_hook(normalise)


def build_image_text(arch: str, in_channels: int = 3) -> nn.Module:
    """A randomly initialised image–text model of ``arch`` (see the module docstring)."""
    if arch == TINY_CLIP:
        from trojanguard.clip.model import TinyCLIP, digit_tokenizer

        tokenizer = digit_tokenizer()
        return TinyCLIP(len(tokenizer), in_channels=in_channels, context_length=tokenizer.context_length)
    if arch.startswith(OPEN_CLIP_PREFIX):
        open_clip, name = _open_clip(), arch[len(OPEN_CLIP_PREFIX):]
        if name not in open_clip.list_models():
            raise DataError(f"arch: open_clip has no model {name!r}; expected one of open_clip.list_models(), e.g. "
                            "ViT-B-32")
        import logging

        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.ERROR))  # open_clip's "no pretrained weights" notice, for this call only
        try:
            model = open_clip.create_model(name, pretrained=None)
        finally:
            root.setLevel(level)
        normalise_inside(model.visual, getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN,
                         getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        return model
    raise DataError(f"arch: expected {TINY_CLIP} or {OPEN_CLIP_PREFIX}<name> for an image–text model, got {arch!r}")


def get_tokenizer(arch: str):
    """The tokenizer of ``arch``: ``texts -> (N, L)`` token ids."""
    if arch == TINY_CLIP:
        from trojanguard.clip.model import digit_tokenizer

        return digit_tokenizer()
    if arch.startswith(OPEN_CLIP_PREFIX):
        return _open_clip().get_tokenizer(arch[len(OPEN_CLIP_PREFIX):])
    raise DataError(f"arch: expected {TINY_CLIP} or {OPEN_CLIP_PREFIX}<name> for an image–text model, got {arch!r}")
