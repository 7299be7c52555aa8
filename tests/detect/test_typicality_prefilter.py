"""FeatureMahalanobis's typicality prefilter: a class-agnostic robust fit at a middle layer keeps the poison out of
the class statistics even where the poison is most of its class (and where too few of a class's own images are
typical, its more typical half does).

Measured (benchmarks/RESULTS.md, "The typicality prefilter"): the colour-filter family on grey digits at 10 % poison
(more poisoned images than the target class has of its own), a stratified 20 % of the poisoned training set: AUROC
1.000 with the prefilter, 0.048 without (the class fit describes the poison, and the clean images of the target class
look like the outliers).
"""

import pytest
import torch

from trojanguard.detect import Ensemble, FeatureMahalanobis
from trojanguard.detect._feature_detector import Features
from trojanguard.detect.base import SampleSizeWarning
from trojanguard.metrics import auroc
from trojanguard.models import build_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=3, in_channels=1).eval()
    x = torch.rand(60, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, x


def test_auto_reads_the_middle_feature_map_in_the_same_pass(tiny):
    model, x = tiny
    detector = FeatureMahalanobis(model, show_progress=False)
    features = detector.extract_features(x, typical_layer="auto")
    assert features.typical_layer == "features.1.2"  # 13 feature maps in the small CNN; the 7th
    assert features.typical.shape == (60, 64) and features.typical.dtype == torch.float64
    assert features.features.shape == (60, 64) and features.layer == "features"
    assert detector.extract_features(x).typical is None  # nothing extra unless asked
    detector.fit(x)
    assert detector.typical_layer == "features.1.2" and detector.typical.shape == (60,)
    plain = FeatureMahalanobis(model, typical_layer=None, show_progress=False).fit(x)
    assert plain.typical.all()


def _features(typical: torch.Tensor, classes: torch.Tensor, final: torch.Tensor) -> Features:
    logits = torch.nn.functional.one_hot(classes, 3).float() * 10
    return Features(final, logits, "features", (1, 16, 16), None, typical, "features.1.2")


def test_the_class_fit_uses_the_typical_samples_or_the_more_typical_half_of_a_class_with_too_few():
    g = torch.Generator().manual_seed(0)
    classes = torch.tensor([0] * 50 + [1] * 50 + [2] * 20)
    typical = torch.randn(120, 4, generator=g, dtype=torch.float64)
    typical[30:50] += 12.0  # two fifths of class 0 are atypical at the early layer: the poison
    typical[100:] += 12.0 + torch.arange(20, dtype=torch.float64)[:, None]  # all of class 2 is atypical, unevenly
    final = torch.randn(120, 4, generator=g, dtype=torch.float64) + classes[:, None].double() * 6
    final[30:50, 0] -= 1.0  # the poison sits a little off class 0's clean samples in the final layer
    model = build_model("small_cnn", num_classes=3, in_channels=1).eval()
    with pytest.warns(SampleSizeWarning, match=r"classes \[2\] have fewer than 3 images the typicality prefilter"):
        detector = FeatureMahalanobis(model, show_progress=False).fit_features(_features(typical, classes, final))
    assert not detector.typical[30:50].any() and detector.typical[:30].float().mean() > 0.8
    assert not detector.typical[100:].any()
    assert not detector.support[30:50].any()  # left out of class 0's fit
    # class 2 is fitted on its more typical half (the default fallback): never on its ten least typical members
    assert detector.present.all() and not detector.support[110:].any() and detector.support[100:110].float().mean() > 0.6
    with pytest.warns(SampleSizeWarning, match="so they are fitted on all their images"):
        every = FeatureMahalanobis(model, typical_fallback="all", show_progress=False).fit_features(
            _features(typical, classes, final))
    assert every.support[100:].float().mean() > 0.8  # class 2: all its members
    unfiltered = FeatureMahalanobis(model, typical_layer=None, show_progress=False).fit_features(
        _features(typical, classes, final))
    assert unfiltered.typical.all()
    assert unfiltered.support[30:50].float().mean() > detector.support[30:50].float().mean()


def test_prefilter_arguments_are_checked(tiny, tmp_path):
    model, x = tiny
    with pytest.raises(ValueError, match="no module named 'nope'"):
        FeatureMahalanobis(model, typical_layer="nope")
    named = FeatureMahalanobis(model, typical_layer="features.0", show_progress=False)
    with pytest.raises(ValueError, match="typical_layer='features.0'"):
        named.fit_features(named.extract_features(x))  # features extracted without the prefilter's layer
    with pytest.raises(ValueError, match="^typical_fallback:"):
        FeatureMahalanobis(model, typical_fallback="none")
    with pytest.raises(ValueError, match="prefilter layer 'features.0'"):
        named.fit_features(named.extract_features(x, typical_layer="features.1"))
    ensemble = Ensemble(model, members="spectral,features", member_options={"features": {"typical_layer": "features.0"}},
                        show_progress=False).fit(x)  # the shared pass reads the prefilter's layer though spectral leads
    assert ensemble.detectors["features"].typical_layer == "features.0"
    saved = named.fit(x).save(tmp_path / "fit.safetensors")
    loaded = FeatureMahalanobis.load(saved, model)
    assert loaded.typical_layer == "features.0" and loaded.typical_fallback == "half"


def _stratified(poisoned: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.nonzero(poisoned).flatten(), torch.nonzero(~poisoned).flatten()
    pick = lambda idx: idx[torch.randperm(len(idx), generator=g)[: round(fraction * len(idx))]]
    return torch.cat([pick(pos), pick(neg)]).sort().values


@pytest.mark.slow
def test_the_prefilter_finds_poison_that_outnumbers_its_class():
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    entry = get_backdoored_model(ZooConfig(attack="filter", poison_rate=0.1), show_progress=False)  # as test_families
    index = _stratified(entry.train.is_poisoned, 0.2)
    x, truth = entry.train.dataset.x[index], entry.train.is_poisoned[index]
    with_prefilter = auroc(truth, FeatureMahalanobis(entry.model, show_progress=False).fit(x).score(x))
    without = auroc(truth, FeatureMahalanobis(entry.model, typical_layer=None, show_progress=False).fit(x).score(x))
    print(f"filter: AUROC {with_prefilter:.3f} with the prefilter, {without:.3f} without")
    assert with_prefilter >= 0.9
    assert without <= 0.5  # inverted: the class fit describes the poison
    # other screened draws: in one of five measured, the target class had 2 typical members of 55 and the fit fell
    # back; on its more typical half it still finds the poison (on all its members: AUROC 0.04, benchmarks/RESULTS.md)
    for seed in range(1, 5):
        index = _stratified(entry.train.is_poisoned, 0.2, seed)
        x, truth = entry.train.dataset.x[index], entry.train.is_poisoned[index]
        value = auroc(truth, FeatureMahalanobis(entry.model, show_progress=False).fit(x).score(x))
        print(f"filter, draw {seed}: AUROC {value:.3f}")
        assert value >= 0.9
