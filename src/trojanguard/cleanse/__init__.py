"""Cleansers of backdoored models: ``cleanse(model, data) -> nn.Module`` (a new model) plus a ``report``.

* :class:`BCU` — Backdoor Cleansing with Unlabeled data (in- or out-of-distribution images).

``CLEANSERS`` names them for the ``trojanguard cleanse --method`` option (``register_cleanser`` adds one).
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
from trojanguard.cleanse.bcu import (
    BCU,
    BCUConfig,
    LayerRatio,
    layer_ratios,
    parametrised_layers,
    reinitialize,
)
from trojanguard.cleanse.registry import CLEANSERS, RegisteredCleanser, register_cleanser

__all__ = [
    "BCU",
    "CLEANSERS",
    "BCUConfig",
    "CleanseError",
    "CleanseReport",
    "Cleanser",
    "DistillSettings",
    "EpochRow",
    "Evaluation",
    "LayerRatio",
    "RegisteredCleanser",
    "batch_statistics_agreement",
    "distill",
    "distillation_loss",
    "layer_ratios",
    "logit_matching_loss",
    "normalisation_gap",
    "parametrised_layers",
    "register_cleanser",
    "reinitialize",
    "temperature_at",
]
