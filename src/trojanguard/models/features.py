"""Intermediate features of any ``nn.Module`` by name, through forward hooks, and the working copy that
detectors run instead of the caller's model (frozen, eval mode, optionally channels_last / conv-BN fused).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from trojanguard.models.compiled import is_compiled

log = logging.getLogger(__name__)

POOLING_TYPES = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.FractionalMaxPool2d,
)


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the network is not needed once the layer has run."""


def module_by_name(model: nn.Module, name: str) -> nn.Module:
    if is_compiled(model) and name != "":
        raise ValueError(f"layer: the model is compiled (TorchScript / torch.export), so its layers cannot be hooked; "
                         f"expected layer='' (its output) or none, got {name!r}")
    modules = dict(model.named_modules())
    if name not in modules:
        shown = ", ".join(n for n in list(modules)[1:40] if n)
        raise ValueError(f"layer: the model has no module named {name!r}; some of its modules: {shown}")
    return modules[name]


@torch.no_grad()
def default_feature_layer(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the last module (in order of completion) whose output is a 4-D map and that is not a pooling
    layer: the last convolutional stage before global pooling (the layer CD-F and feature detectors use).
    A compiled model (TorchScript / torch.export) cannot be hooked inside: ``""``, its output, is the feature."""
    if is_compiled(model):
        return ""
    order: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out, n=n: order.append((n, mod, out)))
        for n, m in model.named_modules() if n
    ]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    candidates = [n for n, m, out in order
                  if isinstance(out, torch.Tensor) and out.dim() == 4 and not isinstance(m, POOLING_TYPES)]
    if not candidates:
        raise ValueError("layer: the model has no module with a 4-D (N, C, H, W) output; pass layer=<name>")
    return candidates[-1]


class LayerOutput(nn.Module):
    """``forward(x)`` returns the output of ``model``'s module ``layer`` (the rest of the forward pass is
    skipped); ``layer=None`` returns the model's own output."""

    def __init__(self, model: nn.Module, layer: str | None = None):
        super().__init__()
        self.model, self.layer = model, layer
        self._module = None if layer is None else module_by_name(model, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._module is None:
            return self.model(x)
        captured: list[torch.Tensor] = []

        def hook(module, inputs, output):
            captured.append(output)
            raise _StopForward

        handle = self._module.register_forward_hook(hook)
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"layer: module {self.layer!r} did not run in the model's forward pass")
        out = captured[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"layer: module {self.layer!r} returns {type(out).__name__}, expected a tensor")
        return out


def _fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into the preceding convolution (FX); the model unchanged when untraceable."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model, inplace=True)
    except Exception as exc:  # noqa: BLE001 — any tracing failure just means no fusion
        log.debug("conv-BN fusion skipped: %s", exc)
        return model


def working_copy(model: nn.Module, *, channels_last: bool = False, fuse_conv_bn: bool = False
                 ) -> tuple[nn.Module, Callable[[], None]]:
    """A frozen, eval-mode network to run instead of ``model``, and a function that undoes any change.

    A deep copy when possible (then channels_last and conv-BN fusion may be applied and ``model`` is never
    touched); otherwise ``model`` itself is switched to eval/frozen and the returned function restores its
    training flags and ``requires_grad`` exactly.
    """
    try:
        net = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 — some modules cannot be copied; fall back to restore-after-use
        log.debug("deepcopy of the model failed (%s); running it in place and restoring it after", exc)
        flags = {m: m.training for m in model.modules()}
        grads = {p: p.requires_grad for p in model.parameters()}
        model.eval().requires_grad_(False)

        def restore() -> None:
            for m, training in flags.items():
                m.training = training
            for p, requires in grads.items():
                p.requires_grad_(requires)

        return model, restore
    net.eval().requires_grad_(False)
    if fuse_conv_bn:
        net = _fuse_conv_bn(net)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, lambda: None


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")
