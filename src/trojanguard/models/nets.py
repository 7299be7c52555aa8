"""Model definitions and the registry of architecture names."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x − mean) / std`` inside the model, so every caller feeds pixels in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Three conv blocks + linear head; ~100k parameters, trains on digits in seconds on a CPU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(in_channels, width), block(width, 2 * width), block(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3×3 stem, no max-pool, stages of 64/128/256/512 channels."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


MODELS: dict[str, Callable[..., nn.Module]] = {"small_cnn": SmallCNN, "resnet18_cifar": ResNet18}


def build_model(arch: str, num_classes: int = 10, in_channels: int = 3,
                normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> nn.Module:
    """Build ``arch``: a trojanguard name (``small_cnn``, ``resnet18_cifar``), ``torchvision:<name>``, or an
    image–text model (``tiny_clip``, ``open_clip:<name>``; :mod:`trojanguard.clip.loading`).

    ``normalize=(mean, std)`` prepends a :class:`Normalize` layer so the model takes pixels in [0, 1].
    """
    from trojanguard.clip.loading import build_image_text, is_image_text_arch

    if arch in MODELS:
        net = MODELS[arch](num_classes=num_classes, in_channels=in_channels)
    elif is_image_text_arch(arch):  # an image–text model: its classes are its prompts
        net = build_image_text(arch, in_channels=in_channels)
    elif arch.startswith("torchvision:"):
        import torchvision

        name = arch.split(":", 1)[1]
        try:
            net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        except ValueError as exc:
            raise ValueError(f"arch: torchvision has no model {name!r}: {exc}") from None
    else:
        raise ValueError(f"arch: unknown architecture {arch!r}; expected one of {sorted(MODELS)}, "
                         "'torchvision:<name>', or an image–text model: tiny_clip, 'open_clip:<name>'")
    if normalize is not None:
        net = nn.Sequential(Normalize(*normalize), net)
    return net
