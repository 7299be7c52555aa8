"""Cleansers of backdoored models: ``cleanse(model, data) -> nn.Module`` (a new model) plus a ``report``.

* :class:`BCU` — Backdoor Cleansing with Unlabeled data (in- or out-of-distribution images).
* :class:`MIMIC` — a backdoored self-supervised encoder distilled into a random student, guided by mutual
  information (a few percent of the pre-training images, unlabeled).

``CLEANSERS`` names them for the ``trojanguard cleanse --method`` option (``register_cleanser`` adds one).
Every method trains with :func:`train` (one loop; the method gives its per-batch step) and is measured by an
evaluation of its model kind: :class:`Evaluation` (classifier), :class:`LinearProbeEvaluation` (encoder),
:class:`ZeroShotEvaluation` (image–text model).
"""

from trojanguard.cleanse._training import StepResult, Trained, train
from trojanguard.cleanse.base import CleanseError, Cleanser, CleanseReport, EpochRow
from trojanguard.cleanse.bcu import (
    BCU,
    BCUConfig,
    LayerRatio,
    layer_ratios,
    parametrised_layers,
    reinitialize,
)
from trojanguard.cleanse.distillation import (
    DistillationStep,
    DistillSettings,
    batch_statistics_agreement,
    distill,
    distillation_loss,
    logit_matching_loss,
    normalisation_gap,
    temperature_at,
)
from trojanguard.cleanse.evaluation import Evaluation, LinearProbeEvaluation, ZeroShotEvaluation
from trojanguard.cleanse.mimic import MIMIC, MIMICConfig
from trojanguard.cleanse.registry import CLEANSERS, RegisteredCleanser, register_cleanser

__all__ = [
    "BCU",
    "CLEANSERS",
    "MIMIC",
    "BCUConfig",
    "CleanseError",
    "CleanseReport",
    "Cleanser",
    "DistillSettings",
    "DistillationStep",
    "EpochRow",
    "Evaluation",
    "LayerRatio",
    "LinearProbeEvaluation",
    "MIMICConfig",
    "RegisteredCleanser",
    "StepResult",
    "Trained",
    "ZeroShotEvaluation",
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
    "train",
]
