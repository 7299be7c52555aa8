"""Backbones for self-supervised learning: the SDK's classifiers with their classification head removed.

The nets of :mod:`trojanguard.models.nets` end in one linear layer on pooled features; replacing that layer by
``nn.Identity`` leaves a module whose output is the pooled features ``(N, D)``, so the state dict keeps the
classifier's layer names (a backbone's weights load into the same architecture, and a classifier's weights,
minus the head, into the backbone).
"""

from __future__ import annotations

from torch import nn

from trojanguard.models.nets import build_model

# architecture -> (name of its classification head, feature size D it leaves)
BACKBONE_HEADS: dict[str, tuple[str, int]] = {"small_cnn": ("head", 256), "resnet18_cifar": ("linear", 512)}


def build_backbone(arch: str, in_channels: int = 3) -> nn.Module:
    """``arch`` (a key of :data:`BACKBONE_HEADS`) without its head: ``x (N, C, H, W) in [0, 1] -> (N, D)``."""
    if arch not in BACKBONE_HEADS:
        raise ValueError(f"arch: expected a backbone architecture, one of {sorted(BACKBONE_HEADS)}, got {arch!r}")
    head, _ = BACKBONE_HEADS[arch]
    net = build_model(arch, num_classes=2, in_channels=in_channels)
    setattr(net, head, nn.Identity())
    return net
