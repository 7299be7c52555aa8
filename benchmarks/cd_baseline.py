"""Baseline Cognitive Distillation: a straightforward eager implementation of the authors' recipe, step by
step (METHODS.md §1), used as the yardstick for the SDK detector's AUROC and speed.

As in the authors' code: parameters are left trainable (the backward pass also computes weight gradients),
δ is drawn with ``torch.rand`` every step, the L1 and TV terms go through autograd, the batch-mean loss feeds
``torch.optim.Adam`` with betas (0.1, 0.1). Unlike their latest code, the preprocessing (if any) is applied
to the perturbed inputs too (their pitfall, not copied). Returns Σ m per sample (small = suspicious).
"""

from __future__ import annotations

import torch
from torch import nn


def total_variation(mask: torch.Tensor) -> torch.Tensor:
    """[Σ(Δ_h m)² + Σ(Δ_w m)²] / (H·W) per sample."""
    h, w = mask.shape[-2:]
    dh = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).pow(2).sum(dim=(1, 2, 3))
    dw = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).pow(2).sum(dim=(1, 2, 3))
    return (dh + dw) / (h * w)


def baseline_cd_l1(model: nn.Module, x: torch.Tensor, *, mode: str = "logits", feature_fn=None,
                   lr: float = 0.1, alpha: float = 0.01, beta: float = 1.0, steps: int = 100,
                   batch_size: int = 100, seed: int = 0) -> torch.Tensor:
    """Σ m of each image of ``x (N, C, H, W)`` in [0, 1]; ``feature_fn(model, x)`` gives CD-F's features."""
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    target = (lambda z: feature_fn(model, z)) if mode == "features" else model
    out = []
    for start in range(0, len(x), batch_size):
        images = x[start : start + batch_size]
        b, c, h, w = images.shape
        mask_param = torch.ones(b, 1, h, w, device=x.device, requires_grad=True)
        optimizer = torch.optim.Adam([mask_param], lr=lr, betas=(0.1, 0.1), eps=1e-8)
        with torch.no_grad():
            reference = target(images)
        for _ in range(steps):
            optimizer.zero_grad()
            mask = (torch.tanh(mask_param) + 1) / 2
            noise = torch.rand(b, c, 1, 1, generator=generator, device=x.device)
            x_adv = images * mask + (1 - mask) * noise
            distance = (target(x_adv) - reference).abs().flatten(1).mean(1)
            loss = distance + alpha * mask.abs().sum(dim=(1, 2, 3)) + beta * total_variation(mask)
            loss.mean().backward()
            optimizer.step()
        mask = (torch.tanh(mask_param.detach()) + 1) / 2
        out.append(mask.flatten(1).sum(1))
    return torch.cat(out)
