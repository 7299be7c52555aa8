"""Supervised training loop used by the zoo (and by users who want a baseline model)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from trojanguard.data.core import ImageDataset
from trojanguard.progress import progress


def train_classifier(model: nn.Module, data: ImageDataset, *, epochs: int = 15, lr: float = 2e-3,
                     batch_size: int = 64, weight_decay: float = 5e-4, seed: int = 0,
                     augment_shift: int = 2, show_progress: bool = True) -> nn.Module:
    """Train with Adam + cosine schedule and random-shift augmentation; returns the model in eval mode."""
    if data.y is None:
        raise ValueError("train_classifier: the dataset has no labels")
    torch.manual_seed(seed)
    loader = DataLoader(data.torch_dataset(), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in progress(range(epochs), desc="train", enable=show_progress):
        for x, y in loader:
            if augment_shift:
                dx, dy = torch.randint(-augment_shift, augment_shift + 1, (2,)).tolist()
                x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()
