"""The probe filter: the ensemble's ``features`` member fits each predicted class without the half of it the shallow
label probe finds easiest (``easier_half``, ``FeatureMahalanobis.fit_features(left_out=)``, ``Ensemble(probe_filter=)``)
— where a class is half poison and the typicality prefilter keeps the poison, the class is still fitted on its own
images."""

import math

import pytest
import torch
from helpers import random_images, small_classifier

from trojanguard.detect import Ensemble, FeatureMahalanobis
from trojanguard.detect._feature_detector import Features
from trojanguard.detect.label_probe import easier_half
from trojanguard.metrics import auroc


def test_easier_half_takes_the_highest_scores_of_each_class_rounded_down():
    scores = torch.tensor([5.0, 1.0, 3.0, math.nan, 2.0, 9.0, 0.0, 4.0])
    classes = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    # class 0 (4 images): 5 and 3; NaN counts as hardest. class 1 (3): 9. class 2 (1): none.
    assert easier_half(scores, classes).tolist() == [True, False, True, False, False, True, False, False]
    with pytest.raises(ValueError, match=r"^scores: expected one score per class entry \(8\)"):
        easier_half(scores[:5], classes)


def two_population_class(seed: int = 0) -> tuple[Features, torch.Tensor]:
    """Three classes of 40 around their means; class 0 also holds 44 tight images of another population (a TaCT-like
    target class: half its images are poison that look alike). Returns the features and the truth (the 44)."""
    g = torch.Generator().manual_seed(seed)
    dim = 6
    means = 6.0 * torch.randn(3, dim, generator=g)
    classes = torch.arange(3).repeat_interleave(40)
    values = means[classes] + torch.randn(len(classes), dim, generator=g)
    intruders = means[0] + 4.0 + 0.3 * torch.randn(44, dim, generator=g)  # tighter and more numerous than class 0
    values = torch.cat([values, intruders])
    classes = torch.cat([classes, torch.zeros(44, dtype=torch.long)])
    truth = torch.cat([torch.zeros(120, dtype=torch.bool), torch.ones(44, dtype=torch.bool)])
    logits = torch.nn.functional.one_hot(classes, 3).float() * 10
    return Features(values.double(), logits, "features.2", (3, 8, 8)), truth


def test_a_class_fitted_without_the_left_out_half_measures_it_from_its_own_images():
    features, truth = two_population_class()
    in_class = features.predicted == 0
    plain = FeatureMahalanobis(small_classifier(), typical_layer=None, show_progress=False).fit_features(features)
    plain_scores = plain.as_module().head(features.logits, features.features.float())
    # the robust fit takes the tight majority for the class: its own images score as the outliers
    assert auroc(truth[in_class], plain_scores[in_class]) < 0.1
    filtered = FeatureMahalanobis(small_classifier(), typical_layer=None, show_progress=False).fit_features(
        features, left_out=truth)
    scores = filtered.as_module().head(features.logits, features.features.float())
    assert auroc(truth[in_class], scores[in_class]) > 0.99
    assert not filtered.support[truth].any() and torch.equal(filtered.left_out, truth)
    assert filtered.typical.all()  # what the prefilter called typical, not what the filter left
    with pytest.raises(ValueError, match=r"^left_out: expected one flag per fit image \(164\)"):
        FeatureMahalanobis(small_classifier(), typical_layer=None, show_progress=False).fit_features(
            features, left_out=truth[:10])


def test_the_ensemble_filters_features_by_the_shallow_probe_where_both_are_members():
    model, x = small_classifier(), random_images(48, seed=3)
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[:6] = (labels[:6] + 1) % 4  # labels the untrained model mostly agrees with, of two classes at least
    ensemble = Ensemble(model, members="features,probe-shallow", show_progress=False).fit(x, labels)
    assert ensemble.fitted_probe_filter == "probe-shallow"
    expected = easier_half(ensemble.detectors["probe-shallow"].fit_scores, ensemble.reference_predicted)
    assert torch.equal(ensemble.detectors["features"].left_out, expected) and expected.any()
    for members, probe_filter in (("features,clustering", "auto"), ("features,probe-shallow", None)):
        other = Ensemble(model, members=members, probe_filter=probe_filter, show_progress=False).fit(x, labels)
        assert other.fitted_probe_filter is None and other.detectors["features"].left_out is None
    middle = Ensemble(model, members="features,probe", probe_filter="probe", show_progress=False).fit(x, labels)
    assert middle.fitted_probe_filter == "probe"
    assert "probe_filter='auto'" in repr(Ensemble(model))


def test_the_filter_is_dropped_with_a_probe_that_steps_aside():
    from trojanguard.detect.base import SampleSizeWarning

    one_class = small_classifier()
    with torch.no_grad():
        one_class.head.bias.copy_(torch.tensor([100.0, 0.0, 0.0, 0.0]))
    with pytest.warns(SampleSizeWarning):
        ensemble = Ensemble(one_class, members="features,probe-shallow", show_progress=False).fit(
            random_images(40, seed=9))
    assert ensemble.fitted_probe_filter is None and ensemble.detectors["features"].left_out is None


def test_bad_probe_filters_name_the_argument():
    model = small_classifier()
    with pytest.raises(ValueError, match="^probe_filter: expected one of probe, probe-shallow, None or 'auto'"):
        Ensemble(model, probe_filter="typicality")
    with pytest.raises(ValueError, match="^probe_filter: 'probe' filters the 'features' member's class fits, so both"):
        Ensemble(model, members="features,probe-shallow", probe_filter="probe")
