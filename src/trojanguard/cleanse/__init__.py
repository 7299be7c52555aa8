"""Cleansers of backdoored models: ``cleanse(model, data) -> nn.Module`` (a new model) plus a ``report``.

* :class:`BCU` — Backdoor Cleansing with Unlabeled data (in- or out-of-distribution images).
* :class:`MIMIC` — a backdoored self-supervised encoder distilled into a random student, guided by mutual
  information (a few percent of the pre-training images, unlabeled).
* :class:`UBT` — an image–text (CLIP-style) model's backdoor unlearned in token-level parameters, on the suspicious
  pairs it finds in the (poisoned) fine-tuning set (:func:`screen_pairs`); :class:`CleanCLIP` is its baseline.

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
from trojanguard.cleanse.cleanclip import CleanCLIP, CleanCLIPConfig
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
from trojanguard.cleanse.pairs import Pairs
from trojanguard.cleanse.registry import CLEANSERS, RegisteredCleanser, register_cleanser
from trojanguard.cleanse.ubt import UBT, PairScreening, UBTConfig, screen_pairs

__all__ = [
    "BCU",
    "CLEANSERS",
    "MIMIC",
    "UBT",
    "BCUConfig",
    "CleanCLIP",
    "CleanCLIPConfig",
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
    "PairScreening",
    "Pairs",
    "RegisteredCleanser",
    "StepResult",
    "Trained",
    "UBTConfig",
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
    "screen_pairs",
    "temperature_at",
    "train",
]
