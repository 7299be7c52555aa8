"""Image–text architectures and tokenizers by name, for the command line and model files:

* ``tiny_clip`` — the zoo's :class:`~trojanguard.clip.TinyCLIP` with the digits' word tokenizer;
* ``open_clip:<name>`` — an open_clip model built with random weights (``pretrained=None``: nothing is downloaded;
  the weights come from the user's file) and ``open_clip.get_tokenizer(<name>)`` (the optional ``clip`` extra).
"""

from __future__ import annotations

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

        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # "no pretrained weights" notice
        return open_clip.create_model(name, pretrained=None)
    raise DataError(f"arch: expected {TINY_CLIP} or {OPEN_CLIP_PREFIX}<name> for an image–text model, got {arch!r}")


def get_tokenizer(arch: str):
    """The tokenizer of ``arch``: ``texts -> (N, L)`` token ids."""
    if arch == TINY_CLIP:
        from trojanguard.clip.model import digit_tokenizer

        return digit_tokenizer()
    if arch.startswith(OPEN_CLIP_PREFIX):
        return _open_clip().get_tokenizer(arch[len(OPEN_CLIP_PREFIX):])
    raise DataError(f"arch: expected {TINY_CLIP} or {OPEN_CLIP_PREFIX}<name> for an image–text model, got {arch!r}")
