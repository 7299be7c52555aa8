"""The detector protocols: a detector written only against them (here, in the test) runs through ``screen``
(registered with the public registry) and through ``Guard`` and its ONNX export, without touching library code."""

import numpy as np
import pytest
import torch
from helpers import random_images, small_classifier
from torch import nn

from trojanguard.data.batching import iter_image_batches
from trojanguard.detect import CognitiveDistillation
from trojanguard.detect.base import Detector, Explains, Fitted, OnePass, Scores
from trojanguard.guard import Guard, GuardSession, export_onnx
from trojanguard.screening import DETECTORS, register_detector, screen
from trojanguard.screening.detectors import OnePassScorer


class LogitDistanceModule(nn.Module):
    """``x -> (logits, score)``: the distance of the logits to the mean logits of the reference data."""

    def __init__(self, model: nn.Module, centre: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("centre", centre)

    def forward(self, x):
        logits = self.model(x)
        return logits, torch.linalg.vector_norm(logits - self.centre, dim=1)


class LogitDistance(Detector):
    """A toy fourth detector: Fitted (fit, fitted) and OnePass (as_module, input_shape)."""

    def __init__(self, model: nn.Module):
        self.model, self.centre, self.input_shape = model, None, None

    @property
    def fitted(self) -> bool:
        return self.centre is not None

    def fit(self, data, labels=None):
        x = torch.cat([xb for xb, _ in iter_image_batches(data, 64)])  # tensor, Dataset or screen's source
        with torch.no_grad():
            self.centre = self.model(x).mean(0)
        self.input_shape = tuple(x.shape[1:])
        return self

    def as_module(self, model=None):
        return LogitDistanceModule(self.model if model is None else model, self.centre)

    def score(self, x):
        with torch.no_grad():
            return self.as_module()(torch.as_tensor(x))[1]


@pytest.fixture(scope="module")
def model():
    return small_classifier(num_classes=4)


@pytest.fixture(scope="module")
def images():
    return random_images(30, seed=2)


def test_the_library_detectors_declare_their_protocols(model):
    cd = CognitiveDistillation(model, show_progress=False)
    assert isinstance(cd, Detector) and isinstance(cd, Scores)
    assert not isinstance(cd, OnePass) and not isinstance(cd, Fitted) and not isinstance(cd, Explains)
    toy = LogitDistance(model)
    assert isinstance(toy, Detector) and isinstance(toy, Fitted) and isinstance(toy, OnePass)


def test_a_protocol_detector_runs_through_screen(tmp_path, model, images):
    register_detector("logit_distance", LogitDistance, "distance of the logits to their mean (test)", OnePassScorer)
    try:
        result = screen(model, images, detector="logit_distance", out_dir=tmp_path, threshold=1.0, calibration=None,
                        show_progress=False)
    finally:
        del DETECTORS["logit_distance"]
    expected = LogitDistance(model).fit(images).score(images).double().numpy()
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)


def test_a_protocol_detector_runs_in_guard_and_onnx(tmp_path, model, images):
    detector = LogitDistance(model).fit(images[:20])
    guard = Guard(model, detector)
    threshold = guard.calibrate(images[:20], fpr=0.1)
    logits, score, flagged = guard.run(images[20:])
    torch.testing.assert_close(logits, model(images[20:]))
    assert torch.equal(flagged, score > threshold)
    torch.testing.assert_close(score, detector.score(images[20:]))
    assert guard.input_shape == (3, 16, 16)
    session = GuardSession(export_onnx(guard, tmp_path / "toy.onnx", images[:2]), providers="cpu")
    served = session.run(images[20:].numpy())
    np.testing.assert_allclose(served[1], score.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(served[2], (score > threshold).numpy())


def test_guard_and_screen_name_the_missing_protocol(model):
    with pytest.raises(TypeError, match=r"Guard needs a one-pass detector \(OnePass: as_module.*CognitiveDistillation"):
        Guard(model, CognitiveDistillation(model))
    with pytest.raises(TypeError, match=r"needs a one-pass detector .*CognitiveDistillation"):
        OnePassScorer(CognitiveDistillation(model), model)
    register_detector("no_score", lambda model: object(), "not a detector (test)")
    try:
        with pytest.raises(TypeError, match=r"screen needs a detector with score\(x\)"):
            screen(model, torch.rand(4, 3, 16, 16), detector="no_score", out_dir="unused", calibration=None,
                   threshold=1.0, show_progress=False)
    finally:
        del DETECTORS["no_score"]
