"""Cleansers of backdoored models: ``cleanse(model, data) -> nn.Module`` (a new model) plus a ``report``.

* :class:`BCU` — Backdoor Cleansing with Unlabeled data (in- or out-of-distribution images).
"""

from trojanguard.cleanse.base import (
    CleanseError,
    Cleanser,
    CleanseReport,
    DistillSettings,
    EpochRow,
    Evaluation,
    batch_statistics_agreement,
    distill,
    distillation_loss,
    logit_matching_loss,
    normalisation_gap,
    temperature_at,
)
from trojanguard.cleanse.bcu import BCU, LayerRatio, layer_ratios, parametrised_layers, reinitialize

__all__ = [
    "BCU",
    "CleanseError",
    "CleanseReport",
    "Cleanser",
    "DistillSettings",
    "EpochRow",
    "Evaluation",
    "LayerRatio",
    "batch_statistics_agreement",
    "distill",
    "distillation_loss",
    "layer_ratios",
    "logit_matching_loss",
    "normalisation_gap",
    "parametrised_layers",
    "reinitialize",
    "temperature_at",
]
