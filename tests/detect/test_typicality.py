"""Typicality (class-agnostic robust distance) on synthetic features with a known answer: poison that is most of its
class is found where the class-wise detector inverts; without poison no score separates a random subset; the
one-pass module, the middle layer, the ensemble member and bad inputs."""

import pytest
import torch
from helpers import head_scores, random_images, screened_draw, small_classifier

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


def test_the_support_is_decided_in_the_leading_principal_directions():
    """The fewest directions holding 99 % of the variance, at most h // 5 (h = ⌈support_fraction · n⌉); the support is
    what both the full and the leading-direction fit call typical, location and Σ its plain mean and Ledoit-Wolf
    covariance in all D dimensions; where every direction is kept, the fit is the full-dimensional robust fit. (A
    poison cluster apart only along a trailing direction, which the leading directions cannot see: the screen test in
    tests/bad_input/test_detector_input.py, "a batch whose target class is mostly poison".)"""
    from trojanguard.detect.feature_mahalanobis import (
        class_agnostic_fit,
        ledoit_wolf,
        robust_tied_fit,
        support_directions,
    )

    flat = torch.ones(64, dtype=torch.float64)
    assert support_directions(flat, 640) == 64 and support_directions(flat, 288) == 28
    assert support_directions(flat, 4) == 1 and support_directions(flat, 288, 0.75) == 43
    steep = torch.tensor([90.0, 8.0, 1.5, 0.3, 0.1, 0.1], dtype=torch.float64)  # 99 % in the first three
    assert support_directions(steep, 10_000) == 3 and support_directions(torch.zeros(6), 100) == 1
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(100, 32, generator=g, dtype=torch.float64)  # h = 50: decided in 10 directions
    location, covariance, support = class_agnostic_fit(wide)
    full = robust_tied_fit(wide, torch.zeros(100, dtype=torch.long), 1)[2]
    assert 40 <= int(support.sum()) < 100 and not (support & ~full).any()
    assert torch.allclose(location, wide[support].mean(0))
    assert torch.allclose(covariance, ledoit_wolf(wide[support] - location))
    narrow = wide[:, :4]  # h = 50 ≥ 5 · 4 and every direction needed for 99 %: the full-dimensional fit
    expected = robust_tied_fit(narrow, torch.zeros(100, dtype=torch.long), 1)
    fitted = class_agnostic_fit(narrow)
    assert torch.equal(fitted[2], expected[2])
    assert torch.allclose(fitted[0], expected[0][0]) and torch.allclose(fitted[1], expected[1])


@pytest.mark.slow
@pytest.mark.parametrize("draw", [1, 3])
def test_sig_poison_that_is_most_of_its_class_is_atypical_on_every_screened_draw(draw):
    """SIG's zoo model (clean-label: 22 of the target class's ~29 images in a 20 % draw), the screened draws as
    benchmarks/detect_families.py draws them. Deciding the support in all 64 dimensions called 12 and 15 of the 22
    poison typical on these two draws (AUROC 0.73 / 0.57); typical in both that and the leading-direction fit, none
    (≥ 0.999)."""
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    entry = get_backdoored_model(ZooConfig(attack="sig"), show_progress=False)
    poisoned = entry.train.is_poisoned
    index = screened_draw(poisoned, draw)
    detector = Typicality(entry.model, seed=draw, show_progress=False).fit(entry.train.dataset.x[index])
    score = auroc(poisoned[index], detector.score(entry.train.dataset.x[index]))
    print(f"sig, draw {draw}: poison called typical {int(detector.support[poisoned[index]].sum())}, AUROC {score:.3f}")
    assert score >= 0.95 and int(detector.support[poisoned[index]].sum()) <= 2
