"""Spectral Signatures and Activation Clustering on synthetic features with a known answer: a planted minority of one
class shifted along one direction is found (AUROC ≈ 1); without one, no score separates a random subset."""

import pytest
import torch
from helpers import head_scores, random_images, small_classifier

from trojanguard.detect import ActivationClustering, SpectralSignature
from trojanguard.detect._feature_detector import Features
from trojanguard.metrics import auroc

CLASSES, PER_CLASS, DIM, PLANTED, SHIFT = 3, 200, 16, 20, 8.0


def synthetic(planted: bool, seed: int = 0) -> tuple[Features, torch.Tensor]:
    """Gaussian features around a mean per class; with ``planted``, ``PLANTED`` members of class 0 moved ``SHIFT``
    along one unit direction. Returns the features (logits: one-hot classes) and the planted mask."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    centres = torch.randn(CLASSES, DIM, generator=g) * 5
    values = centres[classes] + torch.randn(len(classes), DIM, generator=g)
    truth = torch.zeros(len(classes), dtype=torch.bool)
    if planted:
        direction = torch.nn.functional.normalize(torch.randn(DIM, generator=g), dim=0)
        truth[:PLANTED] = True
        values[truth] += SHIFT * direction
    logits = torch.nn.functional.one_hot(classes, CLASSES).float() * 10
    return Features(values.double(), logits, "features.2", (3, 16, 16)), truth


DETECTORS = {
    "spectral": lambda model: SpectralSignature(model, show_progress=False),
    "spectral-median": lambda model: SpectralSignature(model, scale="median", show_progress=False),
    "clustering": lambda model: ActivationClustering(model, show_progress=False),
    "clustering-distance": lambda model: ActivationClustering(model, score="distance", show_progress=False),
    "clustering-ica": lambda model: ActivationClustering(model, reduction="ica", show_progress=False),
}


@pytest.fixture(scope="module")
def model():
    return small_classifier(num_classes=CLASSES)


# ICA whitens every component to unit variance, so the shift is one of ten equal directions and 2-means cuts the
# isotropic noise as often as the planted minority (AUROC ≈ 0.76 here): a known weakness, not asserted.
@pytest.mark.parametrize("name", [n for n in DETECTORS if n != "clustering-ica"])
def test_a_planted_minority_is_found(model, name):
    features, truth = synthetic(planted=True)
    assert auroc(truth, head_scores(DETECTORS[name](model), features)) > 0.98


@pytest.mark.parametrize("name", DETECTORS)
def test_without_a_planted_minority_no_score_separates(model, name):
    features, _ = synthetic(planted=False, seed=1)
    scores = head_scores(DETECTORS[name](model), features)
    for seed in range(3):  # random 10 % "poison" labels: no detector can rank them
        marked = torch.rand(len(scores), generator=torch.Generator().manual_seed(seed)) < 0.1
        assert 0.35 < auroc(marked, scores) < 0.65


@pytest.mark.parametrize("cls", [SpectralSignature, ActivationClustering])
def test_fit_and_score_on_images_share_the_one_pass_path(model, cls):
    x = random_images(40, seed=3)
    detector = cls(model, show_progress=False).fit(x)
    assert detector.fitted and detector.input_shape == (3, 16, 16) and detector.layer is not None
    scores = detector.score(x)
    assert scores.shape == (40,) and torch.isfinite(scores).all()
    logits, module_scores = detector.as_module()(x)
    assert logits.shape == (40, CLASSES) and torch.allclose(module_scores, scores)


def test_given_labels_replace_the_predictions(model):
    features, _ = synthetic(planted=True)
    predicted = SpectralSignature(model, show_progress=False).fit_features(features)
    swapped = torch.tensor([0, 2, 1])[features.predicted]  # labels 1 and 2 exchanged: their fits exchange too
    labelled = SpectralSignature(model, show_progress=False).fit_features(features, swapped)
    assert torch.allclose(labelled.class_means[[0, 2, 1]], predicted.class_means)
    with pytest.raises(Exception, match="^labels:"):
        labelled.fit_features(features, swapped[:-1])


@pytest.mark.parametrize(("kwargs", "argument"), [({"scale": "max"}, "scale"), ({"reduction": "tsne"}, "reduction"),
                                                  ({"score": "silhouette"}, "score"), ({"components": 0}, "components")])
def test_bad_options_name_the_argument(model, kwargs, argument):
    cls = SpectralSignature if "scale" in kwargs else ActivationClustering
    with pytest.raises(ValueError, match=f"^{argument}:"):
        cls(model, **kwargs)


def test_scoring_before_fit_says_to_fit(model):
    with pytest.raises(RuntimeError, match="fit"):
        SpectralSignature(model, show_progress=False).score(random_images(2))
