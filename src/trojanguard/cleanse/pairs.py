"""The image–caption pairs of the image–text defences (UBT, CleanCLIP): ``(images, tokens)`` tensors, checked.

Accepted: a tuple ``(images, tokens)`` of tensors — images ``(N, C, H, W)`` in [0, 1] as the model takes them,
tokens ``(N, L)`` integer ids from the model's tokenizer — or a ``Dataset`` of ``(image, tokens)`` items (read
whole: the defences score every pair). Files (an ``.npz`` with images and captions, a folder with a captions CSV)
are read by :func:`trojanguard.data.load_pairs`, which tokenizes the captions.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from trojanguard.data.core import check_images
from trojanguard.errors import DataError

MIN_PAIRS = 16  # fewer cannot fill a contrastive batch and a suspicious set


class Pairs:
    """Checked image–caption pairs: ``images (N, C, H, W)`` float in [0, 1], ``tokens (N, L)`` int64."""

    def __init__(self, data, argument: str = "data", minimum: int = MIN_PAIRS):
        if isinstance(data, Dataset):
            data = _read_dataset(data, argument)
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise DataError(f"{argument}: expected a tuple (images, tokens) of tensors or a Dataset of (image, tokens) "
                            f"pairs, got {type(data).__name__}")
        images, tokens = data
        if not isinstance(images, torch.Tensor) or not isinstance(tokens, torch.Tensor):
            raise DataError(f"{argument}: expected (images, tokens) as tensors, got ({type(images).__name__}, "
                            f"{type(tokens).__name__})")
        self.images = check_images(images, f"{argument} images")
        if tokens.dim() != 2 or tokens.is_floating_point() or tokens.dtype == torch.bool or tokens.is_complex():
            raise DataError(f"{argument} tokens: expected (N, L) integer token ids, got {tokens.dtype} of shape "
                            f"{tuple(tokens.shape)}")
        if len(tokens) != len(self.images):
            raise DataError(f"{argument} tokens: expected one caption per image ({len(self.images)}), got {len(tokens)}")
        if len(tokens) < minimum:
            raise DataError(f"{argument}: {len(tokens)} pair(s) are too few; expected at least {minimum}")
        if (tokens < 0).any():
            raise DataError(f"{argument} tokens: expected non-negative token ids, got {int(tokens.min())}")
        self.tokens = tokens.long()

    def __len__(self) -> int:
        return len(self.tokens)


def _read_dataset(dataset: Dataset, argument: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        count = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"{argument}: expected a Dataset with a length (every pair is scored), got "
                        f"{type(dataset).__name__} without one") from None
    images, tokens = [], []
    for i in range(count):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise DataError(f"{argument}[{i}]: expected an (image, tokens) pair, got {type(item).__name__}")
        image, token = item[0], item[1]
        if not isinstance(image, torch.Tensor) or not isinstance(token, torch.Tensor):
            raise DataError(f"{argument}[{i}]: expected (image, tokens) tensors, got ({type(image).__name__}, "
                            f"{type(token).__name__})")
        images.append(image)
        tokens.append(token.reshape(-1))
    if not images:
        raise DataError(f"{argument}: it holds no pairs")
    shapes = {tuple(t.shape) for t in tokens}
    if len(shapes) > 1:
        raise DataError(f"{argument}: expected token rows of one context length, got lengths {sorted(shapes)[:4]}")
    try:
        return torch.stack(images), torch.stack(tokens)
    except RuntimeError:
        raise DataError(f"{argument}: expected images of one shape, got {sorted({tuple(x.shape) for x in images})[:4]}"
                        ) from None
