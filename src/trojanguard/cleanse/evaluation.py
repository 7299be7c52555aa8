"""Measuring a model during cleansing: clean accuracy (CA) and attack success rate (ASR) of each model kind.

* :class:`Evaluation` — a classifier (logits ``(N, K)``): arg-max predictions.
* :class:`LinearProbeEvaluation` — an encoder (features ``(N, D)``): a logistic-regression head fitted on the
  encoder's features of labelled clean images, then applied to held-out clean and triggered images.
* :class:`ZeroShotEvaluation` — an image–text model (``encode_image`` / ``encode_text``): the class whose prompt
  embedding is most similar to the image's (cosine similarity; CLIP's zero-shot classification).

Each is a callable ``evaluation(model) -> {"clean_accuracy": ..., "attack_success_rate": ...}`` (ASR only with a
trigger), which is what a cleanser's ``cleanse(..., evaluation=)`` and the training loop take. The encoder and
image–text evaluations are written against those few methods only, so any model that has them fits. ASR counts
the triggered images whose true class is not the target (or, given the attack, those its ``success_mask`` counts: a
source-specific attack's source classes), as :func:`trojanguard.metrics.attack_success_rate`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from trojanguard.data.core import check_images
from trojanguard.errors import DataError
from trojanguard.metrics import attack_success_rate, clean_accuracy, success_mask

EVAL_BATCH = 256  # images per forward pass while measuring


def _labels(y, n: int, where: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.shape != (n,):
        raise DataError(f"{where}: expected a tensor of shape ({n},), got "
                        f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    return y.long()


def triggered_images(x: torch.Tensor, trigger, target: int | None, where: str) -> torch.Tensor | None:
    """The triggered copies of ``x`` for ``trigger`` — triggered images ``(N, C, H, W)``, an attack (anything with
    ``apply_test(x)`` or ``apply(x)``) or a callable ``x -> x_triggered`` — or None without one. A trigger needs
    its ``target`` class."""
    if trigger is None:
        return None
    if target is None:
        raise DataError(f"{where}.target: a trigger was given, so the attack's target class is needed")
    if isinstance(trigger, torch.Tensor):
        triggered = trigger
    elif hasattr(trigger, "apply_test"):
        triggered = trigger.apply_test(x)
    elif hasattr(trigger, "apply"):
        triggered = trigger.apply(x)
    elif callable(trigger):
        triggered = trigger(x)
    else:
        raise DataError(f"{where}.trigger: expected triggered images, an attack or a callable, "
                        f"got {type(trigger).__name__}")
    triggered = check_images(triggered, f"{where}.trigger")
    if triggered.shape != x.shape:
        raise DataError(f"{where}.trigger: expected triggered images of shape {tuple(x.shape)}, "
                        f"got {tuple(triggered.shape)}")
    return triggered


class _Measured:
    """Labelled clean images ``x: (N, C, H, W)`` in [0, 1], ``y: (N,)``, and optionally their triggered copies."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, trigger, target: int | None, attack=None):
        where = type(self).__name__
        self.x = check_images(x, f"{where}.x")
        self.y = _labels(y, len(x), f"{where}.y")
        self.target = target
        self.x_triggered = triggered_images(self.x, trigger, target, where)
        # whose rule says which triggered images ASR counts: the attack given, else a trigger that is an attack
        if attack is not None and (self.x_triggered is None or not hasattr(attack, "success_mask")):
            raise DataError(f"{where}.attack: expected an attack (with success_mask) beside a trigger, got "
                            f"{type(attack).__name__}" + ("" if self.x_triggered is not None else " without a trigger"))
        self.attack = attack if attack is not None else (trigger if hasattr(trigger, "success_mask") else None)
        # the triggered images ASR counts, decided (and refused, where none counts) now, not at the first measurement
        self.counted = None if self.x_triggered is None else success_mask(self.y, int(target), self.attack)

    def _metrics(self, predict: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """CA (and ASR) of ``predict: images -> predicted classes (N,)``."""
        out = {"clean_accuracy": float((predict(self.x) == self.y).float().mean())}
        if self.x_triggered is not None:
            out["attack_success_rate"] = float((predict(self.x_triggered[self.counted]) == self.target).float().mean())
        return out


class Evaluation(_Measured):
    """Labelled clean images and a trigger, to measure CA (and ASR) of a classifier during cleansing.

    ``x: (N, C, H, W)`` in [0, 1], ``y: (N,)``. ``trigger``: the triggered images ``(N, C, H, W)``, an attack
    (anything with ``apply(x)``, e.g. :class:`trojanguard.attacks.BadNets`) or a callable ``x -> x_triggered``;
    with a trigger, ``target`` (the attack's target class) is required and ASR is reported. ``attack``: whose
    ``success_mask`` says which triggered images ASR counts (default: the trigger when it is an attack, else every
    image not of the target class; a source-specific attack counts its source classes only).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, trigger=None, target: int | None = None, *, attack=None):
        super().__init__(x, y, trigger, target, attack)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        out = {"clean_accuracy": clean_accuracy(model, self.x, self.y)}
        if self.x_triggered is not None:
            out["attack_success_rate"] = attack_success_rate(model, self.x_triggered, self.y, int(self.target),
                                                             self.attack)
        return out


@contextmanager
def eval_mode(owner, default: torch.device):
    """``owner`` (when a module) in eval mode under ``torch.no_grad()``, every module's mode restored afterwards;
    yields the device of its first parameter or buffer (``default`` when it has none or is not a module)."""
    modules = list(owner.modules()) if isinstance(owner, nn.Module) else []
    modes = {m: m.training for m in modules}
    device = next((t.device for t in (*owner.parameters(), *owner.buffers())), default) if modules else default
    try:
        for m in modules:
            m.training = False
        with torch.no_grad():
            yield device
    finally:
        for m, training in modes.items():
            m.training = training


def _features(out, n: int, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or len(out) != n:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"{what}: expected one feature vector per input, (N, D), got {got} for {n} inputs")
    return out.detach().float().cpu()


def embed(fn: Callable[[torch.Tensor], torch.Tensor], owner, x: torch.Tensor, *, batch_size: int = EVAL_BATCH,
          what: str = "encoder output") -> torch.Tensor:
    """``fn(x)`` in batches, with ``owner`` (the module ``fn`` belongs to, if one) in eval mode and the batches on
    its device; the features ``(N, D)`` come back on the CPU, as float."""
    with eval_mode(owner, x.device) as device:
        parts = [fn(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    if any(not isinstance(p, torch.Tensor) for p in parts):
        return _features(next(p for p in parts if not isinstance(p, torch.Tensor)), len(x), what)
    return _features(torch.cat(parts), len(x), what)


class LinearProbeEvaluation(_Measured):
    """CA and ASR of an encoder (``encoder(x) -> (N, D)`` features) through a linear probe.

    Every call fits a logistic regression (on standardised features, scikit-learn) to the encoder's features of the
    labelled clean images ``probe_x: (M, C, H, W)``, ``probe_y: (M,)`` — the encoder changes while it is cleansed,
    so the head is refitted each time — then classifies the held-out clean images ``x``, ``y`` (CA) and their
    triggered copies (ASR; ``trigger`` and ``target`` as for :class:`Evaluation`). ``probe_x`` and ``x`` should not
    overlap: CA on the probe's own training images measures memory, not features.
    """

    def __init__(self, probe_x: torch.Tensor, probe_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 trigger=None, target: int | None = None, *, max_iter: int = 1000):
        super().__init__(x, y, trigger, target)
        self.probe_x = check_images(probe_x, "LinearProbeEvaluation.probe_x")
        self.probe_y = _labels(probe_y, len(probe_x), "LinearProbeEvaluation.probe_y")
        if len(self.probe_y.unique()) < 2:
            raise DataError("LinearProbeEvaluation.probe_y: expected labelled images of at least 2 classes, got "
                            f"{len(self.probe_y.unique())}")
        self.max_iter = max_iter

    def __call__(self, encoder: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=self.max_iter))
        probe.fit(embed(encoder, encoder, self.probe_x).numpy(), self.probe_y.numpy())

        def predict(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(probe.predict(embed(encoder, encoder, images).numpy())).long()

        return self._metrics(predict)


def zero_shot_logits(model, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``logit_scale · cos(image embedding, class text embedding)``, ``(N, K)``, for ``text_features: (K, D)``.
    ``model.logit_scale``, when present, is CLIP's: the logarithm of the scale. The scale never changes the
    arg-max, only how peaked a softmax over the logits is."""
    image_features = F.normalize(images.float(), dim=-1)
    logits = image_features @ F.normalize(text_features.float(), dim=-1).T
    scale = getattr(model, "logit_scale", None)
    if scale is not None:
        logits = logits * torch.as_tensor(scale, dtype=logits.dtype).detach().cpu().exp()
    return logits


class ZeroShotEvaluation(_Measured):
    """CA and ASR of an image–text model (``encode_image(x) -> (N, D)``, ``encode_text(tokens) -> (K, D)``, optional
    ``logit_scale``) by zero-shot classification: each image goes to the class whose prompt embedding is the most
    similar (cosine). ``class_tokens``: the tokenized class prompts, one per class in label order (whatever the
    model's ``encode_text`` takes, e.g. a ``(K, L)`` tensor of token ids). ``trigger`` and ``target`` as for
    :class:`Evaluation`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, class_tokens, trigger=None, target: int | None = None):
        super().__init__(x, y, trigger, target)
        self.class_tokens = class_tokens

    def __call__(self, model) -> dict[str, float]:
        for method in ("encode_image", "encode_text"):
            if not callable(getattr(model, method, None)):
                raise TypeError(f"model: ZeroShotEvaluation needs an image–text model with encode_image and "
                                f"encode_text, got a {type(model).__name__} without {method}")
        tokens = self.class_tokens
        with eval_mode(model, torch.device("cpu")) as device:
            text = model.encode_text(tokens.to(device) if isinstance(tokens, torch.Tensor) else tokens)
        classes = len(text) if isinstance(text, torch.Tensor) else 0
        text = _features(text, classes, "encode_text output")
        if classes < 2:
            raise DataError(f"ZeroShotEvaluation.class_tokens: expected the prompts of at least 2 classes, got {classes}")
        outside = sorted({int(c) for c in self.y.unique() if not 0 <= int(c) < classes})
        if outside:
            raise DataError(f"ZeroShotEvaluation.y: expected labels of the {classes} class prompts (0 … {classes - 1}), "
                            f"got {outside[:5]}")

        def predict(images: torch.Tensor) -> torch.Tensor:
            features = embed(model.encode_image, model, images, what="encode_image output")
            return zero_shot_logits(model, features, text).argmax(1)

        return self._metrics(predict)
