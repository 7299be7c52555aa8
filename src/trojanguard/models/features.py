"""Intermediate features of any ``nn.Module`` by name, through forward hooks (:class:`LayerOutput`: one layer's
output; :class:`FeatureTap`: logits and a layer's pooled feature from one forward pass), the working copy that
detectors run instead of the caller's model (frozen, eval mode, optionally channels_last / conv-BN fused), and
the device a model lives on.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from trojanguard.errors import DataError
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
def feature_map_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules whose output is a 4-D map and that are not pooling layers, in the order their forward
    passes complete on ``example``: the candidate feature layers, shallow to deep."""
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
    return candidates


def default_feature_layer(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the last module (in order of completion) whose output is a 4-D map and that is not a pooling
    layer: the last convolutional stage before global pooling (the layer CD-F and feature detectors use).
    A compiled model (TorchScript / torch.export) cannot be hooked inside: ``""``, its output, is the feature."""
    if is_compiled(model):
        return ""
    return feature_map_layers(model, example)[-1]


def middle_feature_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """The candidate feature layer (:func:`feature_map_layers`) at half the network's depth: deep enough to
    describe texture and parts, shallow enough that it is not yet organised by class (what
    :class:`~trojanguard.detect.FeatureMahalanobis`'s class-agnostic typicality fit reads). None for a compiled
    model (TorchScript / torch.export), which has no inner layer to hook."""
    return _candidate_at_depth(model, example, 2)


def shallow_feature_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """The candidate feature layer (:func:`feature_map_layers`) at a quarter of the network's depth: local
    appearance — edges, colours, small patterns — before the network has combined it into the conjunctions a class
    is made of (what the shallow label probe reads: a trigger that acts only with some source classes is still a
    plain pattern there). None for a compiled model, which has no inner layer to hook."""
    return _candidate_at_depth(model, example, 4)


def _candidate_at_depth(model: nn.Module, example: torch.Tensor, divisor: int) -> str | None:
    """The candidate feature layer 1 / ``divisor`` of the way down (None for a compiled model)."""
    if is_compiled(model):
        return None
    candidates = feature_map_layers(model, example)
    return candidates[(len(candidates) - 1) // divisor]


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
        return output_of(self.model, self._module, self.layer, x)


def output_of(model: nn.Module, module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``module`` (named ``name`` in messages) when ``model(x)`` runs; the rest of the forward pass
    is skipped."""
    captured: list[torch.Tensor] = []

    def hook(mod, inputs, output):
        captured.append(output)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"layer: module {name!r} did not run in the model's forward pass")
    out = captured[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"layer: module {name!r} returns {type(out).__name__}, expected a tensor")
    return out


def global_average(feature: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N, C)``: global average pooling of a feature map."""
    # adaptive_avg_pool2d, not mean(dim=(2, 3)): ONNX Runtime runs GlobalAveragePool in its blocked (NCHWc) layout
    # like the convolutions, so only the pooled (N, C, 1, 1) tensor is reordered back; ReduceMean needs the whole
    # map reordered first (measured 1–2 % of the guard's batch-1 latency)
    return nn.functional.adaptive_avg_pool2d(feature, 1).flatten(1)


def pooled_output(output, layer: str | None, argument: str = "layer") -> torch.Tensor:
    """A hooked module's output as ``(N, D)``: a map ``(N, C, H, W)`` globally averaged, a vector as it is; anything
    else is a DataError naming ``argument`` and the module ``layer``."""
    if not isinstance(output, torch.Tensor) or output.dim() not in (2, 4):
        kind = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise DataError(f"{argument}: module {layer!r} returns {kind}; expected a (N, D) or (N, C, H, W) tensor")
    return global_average(output) if output.dim() == 4 else output


class FeatureTap(nn.Module):
    """``forward(x) -> (logits (N, K), pooled feature (N, D))`` in one forward pass of a private copy of
    ``model`` (a classifier: a module or a :class:`~trojanguard.models.adapters.Classifier`, whose logits are
    checked with ``Classifier.logits``): a forward hook on ``layer`` keeps its output and lets the forward pass
    continue."""

    def __init__(self, model: nn.Module, layer: str | None = None, example: torch.Tensor | None = None):
        super().__init__()
        from trojanguard.models.adapters import Classifier  # imported here: adapters builds on this module

        self._logits = Classifier.logits  # the tap needs a Classifier: its check of (N, K) logits
        if isinstance(model, Classifier):  # the user's own module, so layer names are the user's
            model = model.module
        try:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
        except Exception as exc:  # any copy failure gets one clear message
            raise TypeError(f"model: the detector runs a private copy of the model, but copy.deepcopy failed: "
                            f"{exc}") from exc
        self.layer_name = layer
        self._captured: list[torch.Tensor] = []
        self._handle = None
        self.num_classes: int | None = None
        if layer is not None:
            self._attach(layer)

    def _attach(self, layer: str) -> None:
        self.layer_name = layer
        self._handle = module_by_name(self.model, layer).register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs, output) -> None:
        self._captured.append(output)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._handle is None:
            self._attach(default_feature_layer(self.model, x[:2]))
        self._captured.clear()
        logits = self.model(x)
        if not self._captured:
            raise RuntimeError(f"layer: module {self.layer_name!r} did not run in the model's forward pass")
        feature = self._captured[-1]  # a module run several times: its last output
        self._captured.clear()
        feature = pooled_output(feature, self.layer_name)
        self._logits(logits, x)
        self.num_classes = logits.shape[1]
        return logits, feature if feature.dtype == torch.float32 else feature.float()


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


def model_device(model: nn.Module, *, strict: type[Exception] | None = None, purpose: str = "to run") -> torch.device:
    """The device of ``model``'s first parameter or buffer (cpu for a model without any).

    ``strict``: an exception class raised, with a message naming ``model``, when the model has no parameters or
    buffers ("nothing {purpose}"), spreads them over several devices, or holds them on the 'meta' device."""
    tensors = list(model.parameters()) + list(model.buffers())
    if strict is None:
        return tensors[0].device if tensors else torch.device("cpu")
    devices = {t.device for t in tensors}
    if not devices:
        raise strict(f"model: it has no parameters or buffers, so there is nothing {purpose}")
    if len(devices) > 1:
        raise strict(f"model: its parameters are spread over several devices "
                     f"({', '.join(sorted(map(str, devices)))}); move it to one device first (model.to(device))")
    device = devices.pop()
    if device.type == "meta":
        raise strict("model: its parameters are on the 'meta' device (shapes only, no values); load real "
                     "weights first (e.g. model.to_empty(device='cpu') then load_state_dict)")
    return device
