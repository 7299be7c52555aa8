"""Typicality (class-agnostic robust distance) on synthetic features with a known answer: poison that is most of its
class is found where the class-wise detector inverts; without poison no score separates a random subset; the
one-pass module, the middle layer, the ensemble member and bad inputs."""

import pytest
import torch
from helpers import head_scores, random_images, small_classifier

from trojanguard.detect import Ensemble, FeatureMahalanobis, Typicality
from trojanguard.detect._feature_detector import Features
from trojanguard.errors import DataError
from trojanguard.metrics import auroc
from trojanguard.models.features import middle_feature_layer

CLASSES, PER_CLASS, DIM, SHIFT = 4, 150, 8, 6.0


def synthetic(poisoned: int, seed: int = 0) -> tuple[Features, torch.Tensor]:
    """Gaussian features around a mean per class (class 0 has a quarter of the others' images); the first
    ``poisoned`` samples are added to class 0, moved ``SHIFT`` along one direction — poison that outnumbers its class,
    as a clean-label attack on most of its target class. Returns the features (logits: one-hot classes), the truth."""
    g = torch.Generator().manual_seed(seed)
    clean_classes = torch.cat([torch.zeros(PER_CLASS // 4, dtype=torch.long),
                               torch.arange(1, CLASSES).repeat_interleave(PER_CLASS)])
    classes = torch.cat([torch.zeros(poisoned, dtype=torch.long), clean_classes])
    centres = torch.randn(CLASSES, DIM, generator=g) * 4
    values = centres[classes] + torch.randn(len(classes), DIM, generator=g)
    truth = torch.zeros(len(classes), dtype=torch.bool)
    truth[:poisoned] = True
    direction = torch.nn.functional.normalize(torch.randn(DIM, generator=g), dim=0)
    values[truth] += SHIFT * direction
    logits = torch.nn.functional.one_hot(classes, CLASSES).float() * 10
    return Features(values.double(), logits, "features.2", (3, 16, 16)), truth


@pytest.fixture(scope="module")
def model():
    return small_classifier(num_classes=CLASSES)


def test_poison_that_outnumbers_its_class_is_found_where_the_class_wise_fit_inverts(model):
    features, truth = synthetic(poisoned=60)  # 60 poisoned vs 37 clean in class 0; 12 % of the whole set
    typicality = head_scores(Typicality(model, layer="features.2", show_progress=False), features)
    class_wise = head_scores(FeatureMahalanobis(model, layer="features.2", typical_layer=None, show_progress=False),
                           features)
    assert auroc(truth, typicality) > 0.98
    assert auroc(truth, class_wise) < 0.5  # the class's robust fit describes the poison: its clean images look odd


def test_without_poison_no_score_separates_a_random_subset(model):
    features, _ = synthetic(poisoned=0, seed=1)
    scores = head_scores(Typicality(model, layer="features.2", show_progress=False), features)
    for seed in range(3):
        marked = torch.rand(len(scores), generator=torch.Generator().manual_seed(seed)) < 0.1
        assert 0.35 < auroc(marked, scores) < 0.65


def test_fit_on_images_reads_the_middle_layer_and_the_module_gives_the_same_scores(model):
    x = random_images(60, seed=3)
    detector = Typicality(model, show_progress=False).fit(x)
    assert detector.layer == middle_feature_layer(model, x[:2]) and detector.input_shape == (3, 16, 16)
    scores = detector.score(x)
    assert scores.shape == (60,) and torch.isfinite(scores).all() and detector.support.sum() >= 30
    logits, module_scores = detector.as_module()(x)
    assert logits.shape == (60, CLASSES) and torch.allclose(module_scores, scores)


@pytest.mark.parametrize("members", ["features,typicality", "clustering,typicality"])
def test_the_ensemble_member_scores_as_the_detector_and_shares_the_prefilters_pass(model, members, monkeypatch):
    """Beside ``features`` the member is fitted on the middle layer the shared pass read for the prefilter (no pass of
    its own); without it, on a pass of its own. Either way its scores are the detector's alone."""
    x, new = random_images(48, seed=4), random_images(10, seed=5)
    alone = Typicality(model, show_progress=False).fit(x)
    passes = []
    original = Typicality.extract_features
    monkeypatch.setattr(Typicality, "extract_features", lambda self, *a, **k: passes.append(1) or original(self, *a, **k))
    ensemble = Ensemble(model, members=members, show_progress=False).fit(x)
    assert len(passes) == (0 if members.startswith("features") else 1)
    assert set(ensemble.member_seconds) == {"feature pass", "typicality", "fragility"}  # fragility: its own passes
    assert torch.allclose(ensemble.reference_scores[:, 1].float(), alone.score(x), atol=1e-5)
    assert torch.allclose(ensemble.member_scores(new)[:, 1].float(), alone.score(new), atol=1e-5)


def test_bad_inputs_name_the_argument(model):
    with pytest.raises(ValueError, match="^support_fraction:"):
        Typicality(model, support_fraction=1.0)
    with pytest.raises(DataError, match="^data: expected at least 4 images"):
        Typicality(model, show_progress=False).fit(random_images(3))
    with pytest.raises(DataError, match="^data: the features of the 20 images do not vary"):
        Typicality(model, show_progress=False).fit(torch.full((20, 3, 16, 16), 0.5))
    with pytest.raises(RuntimeError, match=r"fit\(data\)"):
        Typicality(model, show_progress=False).score(random_images(2))
