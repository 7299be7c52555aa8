"""Batch screening of datasets for backdoor-triggered samples: ``screen(model, data, detector=...)``.

Streams the data in batches, appends one durable row per sample to ``results.csv`` (a killed run resumes
where it stopped), sets the threshold on clean reference data (or by a robust outlier rule), and writes a
report (summary JSON, score histogram, grid of the most suspicious samples, HTML page). See docs/screening.md.
"""

from trojanguard.models.io import model_sha256
from trojanguard.screening.api import ScreenResult, screen
from trojanguard.screening.detectors import (
    DETECTORS,
    BatchScorer,
    DetectorUnavailableError,
    available_detectors,
    register_detector,
)
from trojanguard.screening.ray_engine import EngineUnavailableError, RayOptions
from trojanguard.screening.records import ResumeError
from trojanguard.screening.sources import FolderSource, ImageSource, NpzSource, TensorSource, open_source

__all__ = [
    "DETECTORS", "BatchScorer", "DetectorUnavailableError", "EngineUnavailableError", "FolderSource", "ImageSource",
    "NpzSource", "RayOptions", "ResumeError", "ScreenResult", "TensorSource", "available_detectors", "model_sha256", "open_source",
    "register_detector", "screen",
]
