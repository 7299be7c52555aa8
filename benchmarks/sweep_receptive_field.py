"""Would re-using the unmasked image's activations outside each window's receptive field pay (issue 22)? An upper
bound, from the encoder's own layers: per convolution / pooling layer, the share of its output a filled window can
change (the window grown by each kernel and divided by each stride on the way), times the layer's share of the
forward pass's multiply-adds. What lies outside that share is what re-use could skip; gathering the changed region,
its border and the scatter back cost extra, so the real saving is below the bound.

    PYTHONPATH=src .venv/bin/python benchmarks/sweep_receptive_field.py
"""

from __future__ import annotations

import json
import math

import torch
import torchvision
from torch import nn

from trojanguard.ssl.backbones import build_backbone


def bound(model: nn.Module, size: int, window: int) -> dict:
    """Multiply-adds of one forward and the share a window of ``window`` pixels can change, layer by layer."""
    records = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            records.append(("conv", module, output.shape, output[0].numel() * k))
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            records.append(("pool", module, output.shape, 0))
        elif isinstance(module, nn.Linear):
            records.append(("linear", module, output.shape, module.in_features * module.out_features))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear,
                                                                                          nn.MaxPool2d, nn.AvgPool2d))]
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, size, size))
    for h in handles:
        h.remove()
    total = sum(r[3] for r in records)
    # the changed region's side, following the main path (a residual branch's changed region is no larger)
    side, changed = float(window), 0.0
    for kind, module, shape, macs in records:
        if kind == "linear":
            changed += macs
            continue
        kernel = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        stride = module.stride if isinstance(module.stride, int) else module.stride[0]
        out_side = shape[-1]
        if kind == "conv" and kernel == 1 and stride > 1:  # a residual shortcut: beside the path, not on it
            changed += macs * min(1.0, (math.ceil(side / stride) / out_side) ** 2)
            continue
        side = min(out_side, math.ceil((side + kernel - 1) / stride))
        changed += macs * min(1.0, (side / out_side) ** 2)
    return {"size": size, "window": window, "gmacs": round(total / 1e9, 4),
            "changed_share_bound": round(changed / total, 3), "max_speedup_bound": round(total / changed, 2)}


def main() -> None:
    rows = [dict(arch="small_cnn", **bound(build_backbone("small_cnn", in_channels=3), 32, 6)),
            dict(arch="resnet18_cifar", **bound(build_backbone("resnet18_cifar", in_channels=3), 32, 6)),
            dict(arch="torchvision resnet18", **bound(torchvision.models.resnet18(num_classes=2), 224, 16))]
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
