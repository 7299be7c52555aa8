"""CleanCLIP (Bansal et al., ICCV 2023), the baseline UBT is measured against: fine-tune the whole image–text model
on pairs with CLIP's loss plus an in-modal self-supervised loss, so each modality learns its own features and the
cross-modal shortcut a trigger planted weakens (METHODS.md §5).

Loss per batch of ``N`` pairs with image / text embeddings ``U`` / ``V`` and of their views ``Ũ`` / ``Ṽ`` (image:
random crop; caption: a token deleted or two swapped, :mod:`trojanguard.clip.augment`):
``clip_weight · CLIP(U, V) + inmodal_weight · ½ [CE(s · U Ũᵀ) + CE(s · V Ṽᵀ)]`` (``s``: the model's logit scale,
capped at 100). AdamW, cosine schedule. The authors fine-tune a pre-trained CLIP at lr 1e-5 for 10 epochs; a
small model trained from scratch needs a larger rate (the zoo's comparison says which, docs/ubt.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trojanguard.cleanse._training import StepResult, train
from trojanguard.cleanse.base import (
    Cleanser,
    CleanseReport,
    config_with,
    copy_of,
    model_device,
    setting,
)
from trojanguard.cleanse.pairs import Pairs
from trojanguard.models.adapters import ImageText, as_image_text


@dataclass(frozen=True)
class CleanCLIPConfig:
    """CleanCLIP's settings (the authors' defaults but for what a CPU-sized run needs)."""

    epochs: int = setting(10, "fine-tuning epochs")
    lr: float = setting(1e-5, "AdamW learning rate (the authors' for a pre-trained CLIP; a model trained from "
                        "scratch on a small set needs more, e.g. 3e-4 on the tiny zoo CLIP)")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    batch_size: int = setting(64, "pairs per batch")
    clip_weight: float = setting(1.0, "weight of CLIP's cross-modal loss")
    inmodal_weight: float = setting(1.0, "weight of the in-modal self-supervised loss")
    seed: int = setting(0, "seed of the views and batches")
    show_progress: bool = setting(True, "progress lines", report=False)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size: expected at least 2 (a contrast needs a negative), got {self.batch_size}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr: expected a positive finite number, got {self.lr}")
        for name in ("weight_decay", "clip_weight", "inmodal_weight"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: expected a finite number ≥ 0, got {getattr(self, name)}")


def inmodal_loss(original: torch.Tensor, view: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Cross entropy of the scaled cosine similarities of each embedding with its view's among the batch's views
    (one modality)."""
    logits = log_scale.clamp(max=math.log(100)).exp() * F.normalize(original, dim=1) @ F.normalize(view, dim=1).T
    return F.cross_entropy(logits, torch.arange(len(original), device=original.device))


class CleanCLIP(Cleanser):
    """``CleanCLIP(lr=3e-4, ...).cleanse(model, (images, tokens))``: a fine-tuned copy of the image–text model (the
    kind handed in), with per-epoch ``clip`` / ``inmodal`` losses in ``report``."""

    model_kind = ImageText

    def __init__(self, *, config: CleanCLIPConfig | None = None, **settings):
        self.config = config_with(CleanCLIPConfig, config, settings, owner="CleanCLIP")

    def cleanse(self, model: nn.Module, data, *,
                evaluation: Callable[[nn.Module], dict[str, float]] | None = None) -> nn.Module:
        from trojanguard.clip.augment import caption_views, image_views, padding_id
        from trojanguard.clip.model import PairBatches, clip_loss

        start = time.perf_counter()
        config = self.config
        self.report = None
        pairs = data if isinstance(data, Pairs) else Pairs(data)
        original = as_image_text(model)
        device = model_device(original)
        original.check(pairs.images[:2].to(device), pairs.tokens[:2], needed_by="CleanCLIP")
        report = CleanseReport("CleanCLIP", self.report_config(), images=len(pairs))
        if evaluation is not None:
            report.before = evaluation(original)
        student = copy_of(original, "CleanCLIP fine-tunes a copy").requires_grad_(True).train()
        log_scale = getattr(student.module, "logit_scale", None)
        if not isinstance(log_scale, torch.Tensor):
            log_scale = torch.tensor(math.log(1 / 0.07), device=device)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr,
                                      weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
        generator = torch.Generator().manual_seed(config.seed)
        pad = padding_id(pairs.tokens)

        def step(batch, epoch: int, index: int) -> StepResult:
            x, t = batch
            n = len(x)
            images = student.encode_image(torch.cat([x, image_views(x, generator)]))
            texts = student.encode_text(torch.cat([t, caption_views(t, generator, pad).to(t.device)]))
            cross = clip_loss(images[:n], texts[:n], log_scale)
            inmodal = (inmodal_loss(images[:n], images[n:], log_scale) + inmodal_loss(texts[:n], texts[n:], log_scale)) / 2
            return StepResult(config.clip_weight * cross + config.inmodal_weight * inmodal,
                              terms={"clip": cross, "inmodal": inmodal})

        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            trained = train(student, step, PairBatches(pairs.images, pairs.tokens, config.batch_size, config.seed),
                            optimizer=optimizer, scheduler=scheduler, epochs=config.epochs, device=device,
                            evaluation=evaluation, loss_name="CleanCLIP loss", show_progress=config.show_progress,
                            desc="CleanCLIP")
        student.requires_grad_(False).eval()
        report.epochs = trained.rows
        if evaluation is not None:
            report.after = evaluation(student)
        report.seconds = time.perf_counter() - start
        self.report = report
        return student if isinstance(model, ImageText) else student.module
