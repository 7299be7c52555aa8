"""Detectors of poisoned inputs: ``score(x) -> (N,)``, higher = more suspicious."""

from trojanguard.detect.activation_clustering import ActivationClustering
from trojanguard.detect.amortized import AmortizedCD
from trojanguard.detect.base import Detector
from trojanguard.detect.cognitive_distillation import CognitiveDistillation, DistillationResult
from trojanguard.detect.ensemble import Ensemble
from trojanguard.detect.feature_mahalanobis import FeatureMahalanobis
from trojanguard.detect.fragility import NoiseFragility
from trojanguard.detect.label_probe import LabelProbe
from trojanguard.detect.poisoncam import PoisonCAM
from trojanguard.detect.spectral import SpectralSignature
from trojanguard.detect.typicality import Typicality

__all__ = ["ActivationClustering", "AmortizedCD", "CognitiveDistillation", "Detector", "DistillationResult", "Ensemble",
           "FeatureMahalanobis", "LabelProbe", "NoiseFragility", "PoisonCAM",
           "SpectralSignature", "Typicality"]
