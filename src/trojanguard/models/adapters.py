"""Three model kinds, each a small ``nn.Module`` around what the user brings, so the rest of the SDK sees one kind:

- :class:`Classifier`: ``x (N, C, H, W) -> logits (N, K)`` (any classifier: the SDK's nets, torchvision, timm).
- :class:`Encoder`: ``x -> features (N, D)``: a module's own output, or a named layer's output pooled to
  ``(N, D)``.
- :class:`ImageText`: ``encode_image(x) -> (N, D)``, ``encode_text(tokens) -> (M, D)`` and, when the model has
  one, ``logit_scale`` (the multiplier of cosine similarities): open_clip models and Hugging Face ``CLIPModel``.

Wrap once at the edge with :func:`as_classifier`, :func:`as_encoder` or :func:`as_image_text` (something already
of that kind comes back unchanged); a method that needs a kind checks it on a few images with the kind's
``check``, which raises a one-line :class:`~trojanguard.errors.DataError` naming the argument, what was expected
and what came. ``.module`` is always the user's module: a method that returns a model (a cleanser) returns that
architecture, never the wrapper. The wrappers hold no state of their own, so they move with ``.to()``, copy,
trace and export like the module inside.

No optional library (open_clip, transformers, timm) is imported here: the image-text styles are recognised by
their methods.
"""

from __future__ import annotations

import torch
from torch import nn

from trojanguard.errors import DataError
from trojanguard.models.features import global_average, model_device, module_by_name, output_of

# what an output object of Hugging Face's get_image_features / get_text_features holds the features in, in order:
# a projection model's ``image_embeds`` / ``text_embeds``; transformers 5's BaseModelOutputWithPooling, whose
# ``pooler_output`` get_*_features overwrites with the projected features (its ``last_hidden_state`` is the
# tower's unprojected tokens and is never taken)
_FEATURE_FIELDS = {"image": ("image_embeds", "pooler_output"), "text": ("text_embeds", "pooler_output")}


def _shape(out) -> str:
    """What came, for messages: ``(2, 10)`` for a tensor, the type's name otherwise."""
    return str(tuple(out.shape)) if isinstance(out, torch.Tensor) else type(out).__name__


def _needs(kind: str, argument: str, needed_by: str | None) -> str:
    return f"{argument}: {needed_by} needs {kind}" if needed_by else f"{argument}: expected {kind}"


def first_layer_hint(model: nn.Module) -> str:
    """What the model's first convolution or linear layer expects, for error messages."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return f"its first convolution expects {module.in_channels} input channels"
        if isinstance(module, nn.Linear):
            return f"its first linear layer expects {module.in_features} input features"
    return "see the model's first layer"


def _run(model: nn.Module, run, sample: torch.Tensor, argument: str):
    """``run(sample)`` on the model's device, without gradients; a failure is the data not fitting the model."""
    shape = tuple(sample.shape[1:])
    try:
        with torch.no_grad():
            return run(sample.to(model_device(model)))
    except Exception as exc:  # noqa: BLE001 — any failure here means the data does not fit the model
        raise DataError(f"data: the {argument} cannot run on images of shape {shape} (C, H, W) from the data — "
                        f"{first_layer_hint(unwrap(model))}; the {argument} said: {type(exc).__name__}: {exc}"
                        ) from None


class Classifier(nn.Module):
    """``forward(x) -> logits (N, K)``: ``module(x)`` unchanged. ``module``: any classifier taking
    ``(N, C, H, W)`` images in [0, 1] (it carries its own normalisation)."""

    kind = "a Classifier"

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(module).__name__}")
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @staticmethod
    def logits(out, x: torch.Tensor | None = None, *, argument: str = "model") -> torch.Tensor:
        """``out`` when it is ``(N, K)`` logits, else a DataError: the per-batch check of code that runs a
        classifier itself (trace- and export-safe: it reads only the number of dimensions)."""
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise DataError(f"{argument}: expected (N, K) logits, got {_shape(out)}")
        return out

    def check(self, sample: torch.Tensor, *, argument: str = "model", min_classes: int = 2,
              non_finite: type[Exception] = DataError) -> int:
        """Run the classifier on ``sample`` (a few images ``(N, C, H, W)``, in the module's current mode, without
        gradients); return its number of classes K.

        Raises DataError when the images do not fit the model, or its output is not ``(N, K ≥ min_classes)``
        logits; ``non_finite`` (DataError unless the caller names its own error) when a logit is NaN or
        infinite.
        """
        shape = tuple(sample.shape[1:])
        out = _run(self.module, self.module, sample, argument)
        if (not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(sample)
                or out.shape[1] < min_classes):
            classes = f"num_classes ≥ {min_classes}" if min_classes > 1 else "num_classes"
            raise DataError(f"{argument} output: expected logits of shape (N, {classes}) for images of shape "
                            f"{shape}, got {_shape(out)}")
        if not torch.isfinite(out).all():
            raise non_finite(f"{argument}: it returns NaN or infinite logits on the data; check its weights and "
                             "the data's range ([0, 1] pixels)")
        return int(out.shape[1])


class Encoder(nn.Module):
    """``forward(x) -> features (N, D)``: the output of ``module``, or of its layer named ``layer``, pooled to
    ``(N, D)``: a ``(N, C, H, W)`` map by global average pooling, ``(N, T, D)`` tokens by their mean.

    ``layer`` names a module inside the user's module (inside ``module.module`` when ``module`` is itself a
    kind, e.g. an :class:`ImageText`, whose output is its image features); with a layer, the rest of the forward
    pass is skipped.
    """

    kind = "an Encoder"

    def __init__(self, module: nn.Module, layer: str | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(module).__name__}")
        self.module, self.layer = module, layer
        if layer is not None:
            module_by_name(unwrap(module), layer)  # a name that does not exist fails here, with the names it has

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            out = self.module(x)
        else:
            out = output_of(self.module, module_by_name(unwrap(self.module), self.layer), self.layer, x)
        return self.pool(out)

    @staticmethod
    def pool(out):
        """``(N, D)`` features from ``(N, D)``, ``(N, T, D)`` or ``(N, C, H, W)``; anything else unchanged."""
        if isinstance(out, torch.Tensor):
            if out.dim() == 4:
                return global_average(out)
            if out.dim() == 3:
                return out.mean(1)
        return out

    def check(self, sample: torch.Tensor, *, argument: str = "model", needed_by: str | None = None) -> int:
        """Run the encoder on ``sample`` (a few images, without gradients); return the feature size D.

        Raises DataError when the images do not fit the model or the output is not finite ``(N, D)`` features.
        ``needed_by`` names the method in the message ("PoisonCAM needs an Encoder: …").
        """
        out = _run(self, self, sample, argument)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(sample):
            where, other = ("a module", "") if self.layer is None else (f"layer {self.layer!r}", "another ")
            raise DataError(f"{_needs(self.kind, argument, needed_by)} (features (N, D) for {len(sample)} images): "
                            f"got {where} whose output is {_shape(out)}; pass {other}layer=<name> to take features "
                            "from one of its layers")
        if not torch.isfinite(out).all():
            raise DataError(f"{argument}: its features are NaN or infinite on the data; check its weights and the "
                            "data's range ([0, 1] pixels)")
        return int(out.shape[1])


class ImageText(nn.Module):
    """``encode_image(x) -> (N, D)``, ``encode_text(tokens) -> (M, D)`` of an image-text model (features as the
    model gives them, not normalised); ``forward`` is ``encode_image`` (so it is also an image encoder).

    ``module`` is open_clip-style (``encode_image(images)``, ``encode_text(tokens)``) or Hugging Face
    ``CLIPModel``-style (``get_image_features(pixel_values=...)``, ``get_text_features(input_ids=...,
    attention_mask=...)``, returning a tensor in transformers 4 and an output object in transformers 5, unwrapped
    here). Images go to the model as given: its own preprocessing (resize, normalisation) is the caller's.
    """

    kind = "an ImageText model"

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(module).__name__}")
        if _has(module, "encode_image", "encode_text"):
            self.style = "open_clip"
        elif _has(module, "get_image_features", "get_text_features"):
            self.style = "hf"
        else:
            raise DataError(f"model: expected {self.kind} (encode_image / encode_text, as open_clip's, or "
                            f"get_image_features / get_text_features, as Hugging Face's CLIPModel), got "
                            f"{type(module).__name__}, which has neither pair")
        self.module = module

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.style == "open_clip":
            return self.module.encode_image(images)
        return _unwrap_features(self.module.get_image_features(pixel_values=images), "image")

    def encode_text(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.style == "open_clip":
            if attention_mask is not None:
                raise ValueError("attention_mask: open_clip-style models take token ids only; expected None")
            return self.module.encode_text(tokens)
        return _unwrap_features(self.module.get_text_features(input_ids=tokens, attention_mask=attention_mask),
                                "text")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)

    @property
    def logit_scale(self) -> torch.Tensor | None:
        """The multiplier of cosine similarities, ``exp`` of the model's stored log value (open_clip and
        ``CLIPModel`` both keep ``logit_scale`` as a log); None when the model has none."""
        value = getattr(self.module, "logit_scale", None)
        return value.exp() if isinstance(value, torch.Tensor) else None

    def check(self, images: torch.Tensor, tokens: torch.Tensor | None = None, *, argument: str = "model",
              needed_by: str | None = None) -> int:
        """Encode ``images`` (and ``tokens``, when given) without gradients; return the feature size D.

        Raises DataError when the images do not fit the model, a side's output is not finite ``(N, D)``
        features, or image and text features differ in size.
        """
        image = _run(self.module, self.encode_image, images, argument)
        self._expect(image, len(images), "encode_image", argument, needed_by)
        if tokens is not None:
            with torch.no_grad():
                text = self.encode_text(tokens.to(model_device(self.module)))
            self._expect(text, len(tokens), "encode_text", argument, needed_by)
            if text.shape[1] != image.shape[1]:
                raise DataError(f"{argument}: image and text features differ in size ({image.shape[1]} and "
                                f"{text.shape[1]}); expected one embedding space")
        return int(image.shape[1])

    def _expect(self, out, n: int, method: str, argument: str, needed_by: str | None) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
            raise DataError(f"{_needs(self.kind, argument, needed_by)}: {method} of {n} inputs returned "
                            f"{_shape(out)}; expected features (N, D)")
        if not torch.isfinite(out).all():
            raise DataError(f"{argument}: {method} returns NaN or infinite features; check its weights and inputs")


def _has(module: nn.Module, *methods: str) -> bool:
    return all(callable(getattr(module, name, None)) for name in methods)


def _unwrap_features(out, side: str):
    """The features tensor of ``get_image_features`` / ``get_text_features``: the tensor itself
    (transformers 4) or the projected features of an output object (transformers 5; see ``_FEATURE_FIELDS``).
    Anything else comes back unchanged, for the caller's check to name."""
    if isinstance(out, torch.Tensor):
        return out
    for field in _FEATURE_FIELDS[side]:
        value = getattr(out, field, None)
        if isinstance(value, torch.Tensor):
            return value
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside any number of kind wrappers (a cleanser returns this architecture)."""
    while isinstance(model, (Classifier, Encoder, ImageText)):
        model = model.module
    return model


def as_classifier(model: nn.Module) -> Classifier:
    """``model`` as a :class:`Classifier` (a Classifier comes back unchanged)."""
    if isinstance(model, Classifier):
        return model
    if isinstance(model, (Encoder, ImageText)):
        raise DataError(f"model: expected {Classifier.kind} ((N, C, H, W) images -> (N, K) logits), got "
                        f"{model.kind}, whose output is features; pass the classifier itself")
    return Classifier(model)


def as_encoder(model: nn.Module, layer: str | None = None) -> Encoder:
    """``model`` as an :class:`Encoder`: its output (``layer=None``) or the named layer's, pooled to ``(N, D)``.

    An Encoder with ``layer=None`` comes back unchanged; a :class:`Classifier` needs ``layer`` (its output is
    logits, not features) and its layers are named as in the user's module; an :class:`ImageText` gives its image
    features.
    """
    if isinstance(model, Encoder) and layer is None:
        return model
    if isinstance(model, Classifier):
        if layer is None:
            raise DataError(f"model: expected {Encoder.kind} (features (N, D)), got {Classifier.kind}, whose "
                            "output is (N, K) logits; pass layer=<name> to take features from one of its layers")
        return Encoder(model.module, layer)
    return Encoder(model, layer)


def as_image_text(model: nn.Module) -> ImageText:
    """``model`` as an :class:`ImageText` (an ImageText comes back unchanged)."""
    return model if isinstance(model, ImageText) else ImageText(model)
