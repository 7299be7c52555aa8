"""Self-supervised learning: a SimCLR trainer whose trained backbone is an :class:`~trojanguard.models.Encoder`.

The SSL defences (PoisonCAM, MIMIC) take an Encoder; this package makes the encoders they are evaluated on,
clean or trained on poisoned unlabeled data (:mod:`trojanguard.attacks.ssl`, zoo: ``get_poisoned_encoder``).
"""

from trojanguard.ssl.augment import SimCLRAugmentation
from trojanguard.ssl.backbones import BACKBONE_HEADS, build_backbone
from trojanguard.ssl.simclr import (
           ProjectionHead,
           SimCLRConfig,
           SimCLRModel,
           SimCLRResult,
           nt_xent,
           train_simclr,
)

__all__ = ["BACKBONE_HEADS", "ProjectionHead", "SimCLRAugmentation", "SimCLRConfig", "SimCLRModel", "SimCLRResult",
           "build_backbone", "nt_xent", "train_simclr"]
