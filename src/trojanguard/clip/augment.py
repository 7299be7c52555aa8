"""Views of image–caption pairs for the image–text defences: image views (random crop, optional flip) and caption
views (one interior token deleted or two swapped), both drawn from a caller's generator so runs repeat.

Caption views work on token ids of any tokenizer without knowing its special tokens: a caption is its first token
(start), its last non-padding token (end) and the interior between them; padding is the trailing run of the id in
the last position (a caption that fills the context has none). Only the interior is edited, so the start and end
tokens stay where a CLIP text tower looks for them.
"""

from __future__ import annotations

import torch

from trojanguard.cleanse.augment import random_crop_flip

CAPTION_EDITS = ("delete", "swap")


def padding_id(tokens: torch.Tensor) -> int:
    """The padding id of a set of captions: the commonest id in the last column (most captions are shorter than
    the context)."""
    return int(tokens[:, -1].mode().values)


def caption_lengths(tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """``(N, L)`` ids -> ``(N,)``: the tokens before the trailing run of ``pad`` (``L`` for a caption without)."""
    positions = torch.arange(1, tokens.shape[1] + 1)
    return ((tokens != pad).long() * positions).amax(1)


def caption_views(tokens: torch.Tensor, generator: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """One random edit per caption: delete an interior token (the rest shifts left, padding refills the end) or
    swap two interior tokens, with equal chance (a caption without padding is only swapped); captions with fewer
    than two interior tokens come back unchanged. ``pad``: the padding id (default: :func:`padding_id`)."""
    tokens = tokens.cpu()
    pad = padding_id(tokens) if pad is None else pad
    out = tokens.clone()
    lengths = caption_lengths(tokens, pad).tolist()
    for row, length in enumerate(lengths):
        interior = length - 2
        if interior < 2:
            continue
        i, j = (torch.randperm(interior, generator=generator)[:2] + 1).tolist()
        delete = bool(torch.rand((), generator=generator) < 0.5) and length < tokens.shape[1]
        if delete:
            out[row, i:length - 1] = tokens[row, i + 1:length]
            out[row, length - 1] = pad
        else:
            out[row, i], out[row, j] = tokens[row, j], tokens[row, i]
    return out


def image_views(images: torch.Tensor, generator: torch.Generator, *, flip: bool = False) -> torch.Tensor:
    """A random crop (zero padding an eighth of the side) of each image, mirrored at random with ``flip`` (off by
    default: a mirrored digit or text is another shape)."""
    return random_crop_flip(images, generator, flip=flip)
