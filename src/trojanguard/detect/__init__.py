"""Detectors of poisoned inputs: ``score(x) -> (N,)``, higher = more suspicious."""

from trojanguard.detect.base import Detector
from trojanguard.detect.cognitive_distillation import CognitiveDistillation, DistillationResult

__all__ = ["CognitiveDistillation", "Detector", "DistillationResult"]
