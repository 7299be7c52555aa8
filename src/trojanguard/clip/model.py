"""A tiny CLIP (Radford et al., 2021) for the zoo: an image tower, a text transformer, a shared embedding space,
trained contrastively on the digits with varied captions. It is open_clip-shaped (``encode_image``,
``encode_text``, ``logit_scale`` as a log), so :class:`~trojanguard.models.ImageText` and the zero-shot evaluation
take it as they take a real CLIP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trojanguard.clip.tokenizer import END, PAD, WordTokenizer
from trojanguard.errors import DataError, check_positive_int

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# captions of the training pairs: several phrasings per class, so the text tower learns the class word, not a sentence
CAPTION_TEMPLATES = ("a photo of the digit {}", "a handwritten {}", "the number {}", "a picture of a {}",
                     "an image showing {}", "{} written by hand", "a scan of the digit {}", "digit {}")
PROMPT_TEMPLATE = "a photo of the digit {}"  # the zero-shot prompt of each class


def digit_captions(labels: torch.Tensor, seed: int = 0) -> list[str]:
    """One caption per label: a seeded random template with the class's name."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(CAPTION_TEMPLATES), (len(labels),), generator=gen).tolist()
    return [CAPTION_TEMPLATES[p].format(DIGIT_NAMES[int(y)]) for p, y in zip(picks, labels.tolist(), strict=True)]


def digit_tokenizer(context_length: int = 12) -> WordTokenizer:
    """The tokenizer of every caption and prompt above."""
    return WordTokenizer.from_texts([t.format(name) for t in (*CAPTION_TEMPLATES, PROMPT_TEMPLATE)
                                     for name in DIGIT_NAMES], context_length)


class TinyCLIP(nn.Module):
    """Image tower (a backbone of :mod:`trojanguard.ssl.backbones` and a linear projection), text tower (token and
    position embeddings, a pre-norm transformer encoder, the end token's state projected), and CLIP's learned
    temperature ``logit_scale`` (stored as a log, initialised to log(1 / 0.07))."""

    def __init__(self, vocab_size: int, *, embed_dim: int = 64, image_arch: str = "small_cnn", in_channels: int = 3,
                 width: int = 64, layers: int = 2, heads: int = 4, context_length: int = 12):
        super().__init__()
        from trojanguard.ssl.backbones import BACKBONE_HEADS, build_backbone

        self.visual = build_backbone(image_arch, in_channels=in_channels)
        self.image_projection = nn.Linear(BACKBONE_HEADS[image_arch][1], embed_dim)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.context_length = context_length

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_projection(self.visual(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.context_length:
            raise DataError(f"tokens: expected (N, {self.context_length}) token ids, got {tuple(tokens.shape)}")
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x, src_key_padding_mask=tokens == PAD))
        end = (tokens == END).int().argmax(1)  # the end token's state summarises the caption (CLIP's EOT)
        return self.text_projection(x[torch.arange(len(tokens)), end])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss: cross entropy of the scaled cosine similarities of N matched pairs, image
    to text and text to image, averaged. ``logit_scale`` is the log of the multiplier (capped at log 100)."""
    image = F.normalize(image_features, dim=1)
    text = F.normalize(text_features, dim=1)
    logits = logit_scale.clamp(max=math.log(100)).exp() * image @ text.T
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@dataclass(frozen=True)
class CLIPTrainConfig:
    """Contrastive training of an image–text model on pairs (AdamW with a cosine schedule)."""

    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            check_positive_int(name, getattr(self, name))
        if self.batch_size < 2:
            raise ValueError(f"batch_size: expected at least 2 pairs (a contrast needs a negative), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr}")


class PairBatches:
    """``(images, tokens)`` pairs in seeded shuffled batches (the loop's ``epoch(e)``); a last batch of one pair is
    dropped (a contrast needs two)."""

    def __init__(self, images: torch.Tensor, tokens: torch.Tensor, batch_size: int, seed: int):
        if len(images) != len(tokens):
            raise DataError(f"tokens: expected one caption per image ({len(images)}), got {len(tokens)}")
        self.images, self.tokens, self.batch_size, self.seed = images, tokens, batch_size, seed

    def epoch(self, epoch: int):
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            if len(index) >= 2:
                yield self.images[index], self.tokens[index]


def train_clip(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, config: CLIPTrainConfig | None = None, *,
               evaluation=None, show_progress: bool = True, device: torch.device | str = "cpu"):
    """Train ``model`` (``encode_image``, ``encode_text``, ``logit_scale``) on matched ``(images, tokens)`` pairs
    with :func:`clip_loss` through the SDK's one loop; returns the loop's per-epoch rows. In place."""
    from trojanguard.cleanse._training import train

    config = config or CLIPTrainConfig()
    device = torch.device(device)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    torch.manual_seed(config.seed)

    def step(batch, epoch: int, index: int) -> torch.Tensor:
        x, t = batch
        return clip_loss(model.encode_image(x), model.encode_text(t), model.logit_scale)

    trained = train(model, step, PairBatches(images, tokens, config.batch_size, config.seed), optimizer=optimizer,
                    scheduler=scheduler, epochs=config.epochs, device=device, evaluation=evaluation,
                    loss_name="CLIP loss", show_progress=show_progress, desc="clip")
    model.eval()
    return trained.rows


def class_prompt_tokens(tokenizer: WordTokenizer, names: Sequence[str] = DIGIT_NAMES) -> torch.Tensor:
    """``(K, L)`` tokens of the zero-shot prompt of each class, in label order."""
    return tokenizer([PROMPT_TEMPLATE.format(name) for name in names])
