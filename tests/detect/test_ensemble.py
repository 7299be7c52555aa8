"""The ensemble: fusion on hand-made member scores (order, ties, monotone maps, a constant member), calibration on
fused scores, the Ensemble class on a small model (fit, reuse of fit scores, calibrate, explain), its registry names
and bad inputs; slow tests on three of the zoo's families."""

import math

import pytest
import torch
from helpers import random_images, small_classifier

from trojanguard.detect import Ensemble
from trojanguard.detect.ensemble import (
    FUSIONS,
    RANK_FUSIONS,
    bimodality_coefficient,
    concentrate,
    concentration_of,
    empirical_cdf,
    fuse,
    outlier_significance,
)
from trojanguard.metrics import auroc
from trojanguard.screening.detectors import DEFAULT_DETECTOR, DETECTORS, build_detector
from trojanguard.thresholds import quantile_threshold, robust_threshold


def member_scores(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3) scores of three members on data where the first 10 % are poison: member 0 separates it well,
    member 1 weakly, member 2 not at all. Returns (scores, truth)."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(n) < n // 10
    noise = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return noise + torch.stack([4.0 * truth, 1.0 * truth, 0.0 * truth], 1), truth


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusion_does_not_depend_on_the_order_of_samples(fusion):
    scores, _ = member_scores(200)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    fused = fuse(scores, scores, fusion)
    assert torch.equal(fuse(scores[order], scores[order], fusion), fused[order])


@pytest.mark.parametrize("fusion", RANK_FUSIONS)
def test_fusion_does_not_depend_on_a_members_scale(fusion):
    scores, _ = member_scores(200)
    rescaled = scores.clone()
    rescaled[:, 0] = torch.exp(3 * scores[:, 0]) + 7  # any increasing map
    assert torch.allclose(fuse(rescaled, rescaled, fusion), fuse(scores, scores, fusion))


def test_rank_fusion_is_the_mean_normalised_mid_rank():
    reference = torch.tensor([[1.0, 5.0], [2.0, 5.0], [2.0, 5.0], [3.0, 5.0]])  # member 1 constant
    ranks = empirical_cdf(reference[:, 0], reference[:, 0])
    assert torch.allclose(ranks, torch.tensor([0.125, 0.5, 0.5, 0.875], dtype=torch.float64))  # ties share
    assert torch.allclose(empirical_cdf(reference[:, 1], reference[:, 1]), torch.full((4,), 0.5, dtype=torch.float64))
    assert torch.allclose(fuse(reference, reference, "rank"), ((ranks + 0.5) / 2).float())


def test_a_constant_member_changes_no_ranking():
    scores, truth = member_scores(300)
    with_constant = torch.cat([scores[:, :1], torch.full((300, 1), 3.0, dtype=torch.float64)], 1)
    for fusion in ("rank", "probit", "zscore"):
        fused = fuse(with_constant, with_constant, fusion)
        assert auroc(truth, fused) == pytest.approx(auroc(truth, scores[:, 0]))
    assert bimodality_coefficient(with_constant[:, 1]) == 0.0


def test_select_picks_the_most_bimodal_member_and_rank_beats_the_weak_ones():
    scores, truth = member_scores(1000)
    bimodality = [bimodality_coefficient(scores[:, m]) for m in range(3)]
    assert max(range(3), key=lambda m: bimodality[m]) == 0
    assert auroc(truth, fuse(scores, scores, "select")) == pytest.approx(auroc(truth, scores[:, 0]))
    assert auroc(truth, fuse(scores, scores, "rank")) > auroc(truth, scores[:, 1])


def test_scores_beyond_the_reference_range_stay_ordered_and_nan_stays_nan():
    reference = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    cdf = empirical_cdf(reference, torch.tensor([-1.0, 4.0, 5.0, float("inf"), float("nan")]))
    assert 0 < cdf[0] < 0.125 and 0.875 < cdf[1] < cdf[2] < cdf[3] == 1.0 and torch.isnan(cdf[4])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_threshold_calibrated_on_clean_fused_scores_holds_its_fpr(fusion):
    """The fused score is a fixed function of the member scores once the reference is set, so the quantile rule
    on clean calibration scores holds on held-out clean scores (large n: within ±1 point of 5 %)."""
    reference, _ = member_scores(2000, seed=2)  # the screened set (10 % poison)
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(40_000, 3, generator=g, dtype=torch.float64)
    fused = fuse(reference, clean, fusion).numpy()
    threshold = quantile_threshold(fused[:20_000], 0.05)
    assert abs((fused[20_000:] > threshold).mean() - 0.05) < 0.01


def concentrated_set(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused scores of 1 000 images, 10 classes of 100: 40 poison, all predicted as class 0, and 225 cover samples
    (altered, true label kept) spread over classes 1–9, scored a little *above* the poison — as WaNet's noise mode
    (twice the poison) is by the default members. Returns (fused, predicted, poison, cover)."""
    g = torch.Generator().manual_seed(seed)
    predicted = torch.arange(1000) // 100
    fused = torch.randn(1000, generator=g, dtype=torch.float64)
    poison = torch.zeros(1000, dtype=torch.bool)
    poison[:40] = True
    cover = torch.zeros(1000, dtype=torch.bool)
    cover[torch.arange(100, 1000, 4)] = True  # 25 a class over classes 1–9
    fused[poison] += 10.0
    fused[cover] += 10.5
    return fused, predicted, poison, cover


def test_class_concentration_ranks_the_poison_class_above_equally_atypical_covers():
    fused, predicted, poison, cover = concentrated_set()
    threshold, factors = concentration_of(fused, predicted, 10)
    assert threshold == pytest.approx(robust_threshold(fused.numpy()))
    assert factors[0] > 1.4 and (factors[1:] < 1).all()
    raised = concentrate(fused, predicted, threshold, factors)
    assert auroc(poison, fused) < 0.85 and auroc(poison, raised) > 0.92
    assert auroc(poison | cover, raised) > 0.99  # the covers stay above the untouched images
    for k in range(10):  # the order within a class never changes; nothing at or below the threshold moves
        inside = predicted == k
        assert torch.equal(fused[inside].argsort(), raised[inside].argsort())
    assert torch.equal(raised[fused <= threshold], fused[fused <= threshold])
    assert torch.equal(raised > robust_threshold(raised.numpy()), fused > threshold)  # the robust rule flags the same


def test_class_concentration_is_one_without_outliers_or_when_they_spread_as_the_classes():
    spread = torch.linspace(-1, 1, 500, dtype=torch.float64)  # no robust outliers
    assert torch.equal(concentration_of(spread, torch.arange(500) % 5, 5)[1], torch.ones(5, dtype=torch.float64))
    even = torch.zeros(500, dtype=torch.float64)
    even[torch.isin(torch.arange(500) % 50, torch.tensor([0, 11, 22, 33, 44]))] = 50.0  # ten outliers a class
    assert torch.allclose(concentration_of(even + 0.01 * spread, torch.arange(500) % 5, 5)[1],
                          torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="^predicted:"):
        concentration_of(even, torch.zeros(3), 5)


def test_outlier_significance_is_small_where_a_members_outliers_gather_in_one_class():
    from scipy.stats import hypergeom

    g = torch.Generator().manual_seed(0)
    predicted = torch.arange(500) % 5
    noise = torch.randn(500, generator=g, dtype=torch.float64)
    gathered, spread = noise.clone(), noise.clone()
    gathered[torch.nonzero(predicted == 0).flatten()[:20]] += 20.0  # 20 outliers, all of class 0 (100 of the 500)
    spread[torch.arange(0, 500, 25) + torch.arange(20) % 5] += 20.0  # 20 outliers, 4 a class
    # P(a class of 100 holds all 20 outliers by chance) = C(100, 20) / C(500, 20)
    assert outlier_significance(gathered, predicted, 5) == pytest.approx(hypergeom.sf(19, 500, 100, 20), rel=1e-9)
    assert outlier_significance(gathered, predicted, 5) < 1e-12
    assert outlier_significance(spread, predicted, 5) > 0.3  # 4 of 20 where 4 are expected
    assert outlier_significance(noise * 0 + 1, predicted, 5) == 1.0  # no outliers: nothing gathers
    nan = gathered.clone()
    nan[1::5] = math.nan  # NaN scores (class 1) count neither as outliers nor in the classes' shares
    assert outlier_significance(nan, predicted, 5) == pytest.approx(hypergeom.sf(19, 400, 100, 20), rel=1e-9)


# ---------------------------------------------------------------------------------------------- the class
@pytest.fixture(scope="module")
def model():
    return small_classifier(num_classes=3)


@pytest.fixture(scope="module")
def fitted(model):
    ensemble = Ensemble(model, members="cd-p,features,spectral,clustering", steps=2, batch_size=16,
                        show_progress=False)
    return ensemble.fit(random_images(48, seed=4))


def test_fit_scores_every_member_and_scoring_the_fit_data_again_reuses_them(fitted):
    assert fitted.reference_scores.shape == (48, 4)
    assert set(fitted.member_seconds) == {"feature pass", "cd-p", "fragility"}
    x = random_images(48, seed=4)
    fitted.detectors["cd-p"].steps = 10_000  # a CD rerun would take minutes: the fit's scores must be reused
    try:
        expected = fitted.fuse(fitted.reference_scores, predicted=fitted.reference_predicted)
        assert torch.allclose(fitted.score(x), expected)
    finally:
        fitted.detectors["cd-p"].steps = 2


def test_new_images_are_scored_by_every_member_and_calibrate_predict_explain_work(fitted):
    clean = random_images(40, seed=5)
    scores, predicted = fitted.member_scores(clean, with_classes=True)
    assert scores.shape == (40, 4) and torch.isfinite(scores).all()
    with torch.no_grad():
        assert torch.equal(predicted, fitted.model.eval()(clean).argmax(1))
    assert torch.allclose(fitted.score(clean), fitted.fuse(scores, predicted=predicted))
    threshold = fitted.calibrate(clean, fpr=0.1)
    assert 0 < threshold < 1 and fitted.predict(clean).float().mean() <= 0.1
    explained = fitted.explain(clean[:3], [0, 1, 2])
    assert explained["masks"].shape == (3, 1, 16, 16) and explained["patterns"].shape == (3, 3, 16, 16)


class Killed(Exception):
    """Stands for a kill part-way through a fit."""


def count_distilled(ensemble: Ensemble, fail_after: int | None = None) -> list[int]:
    """Wrap the CD member's ``iter_distill`` to count the images it distils (one entry per call), raising
    :class:`Killed` on the call after ``fail_after`` calls."""
    cd = ensemble.detectors["cd-p"]
    original, calls = cd.iter_distill, []

    def counting(x, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise Killed
        calls.append(len(x))
        return original(x, **kwargs)

    cd.iter_distill = counting
    return calls


def test_a_killed_fit_resumes_from_its_checkpoint_and_scores_as_an_uninterrupted_fit(model, tmp_path):
    x, checkpoint = random_images(48, seed=8), tmp_path / "fit.csv"
    build = lambda: Ensemble(model, members="cd-p,features", steps=3, batch_size=16, show_progress=False)
    whole = build().fit(x)
    killed = build()
    count_distilled(killed, fail_after=2)
    with pytest.raises(Killed):
        killed.fit(x, checkpoint=checkpoint)
    with open(checkpoint, "a") as f:
        f.write("cd-p,40,ab")  # a line cut short by the kill
    resumed = build()
    calls = count_distilled(resumed)
    resumed.fit(x, checkpoint=checkpoint)
    assert calls == [16]  # only the third batch is distilled
    assert torch.allclose(resumed.reference_scores, whole.reference_scores, atol=1e-6)
    again = build()
    calls = count_distilled(again)
    again.fit(x, checkpoint=checkpoint)
    assert calls == []  # a complete checkpoint: nothing distilled
    other = Ensemble(model, members="cd-p,features", steps=4, batch_size=16, show_progress=False)
    calls = count_distilled(other)
    other.fit(x, checkpoint=checkpoint)
    assert sum(calls) == 48  # another CD setting: the file is started over


def test_a_screen_killed_during_the_ensemble_fit_resumes_it(model, tmp_path, monkeypatch):
    from trojanguard.detect.cognitive_distillation import CognitiveDistillation
    from trojanguard.screening import screen
    from trojanguard.screening.detectors import FIT_CHECKPOINT

    images, options = random_images(40, seed=9), {"members": "cd-p,features", "steps": 2, "batch_size": 16}
    run = lambda out: screen(model, images, detector_options=options, out_dir=out, threshold=0.5, batch_size=16,
                             report=False, show_progress=False)
    original, calls = CognitiveDistillation.iter_distill, []

    def counting(self, x, fail_after=None, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise Killed
        calls.append(len(x))
        return original(self, x, **kwargs)

    monkeypatch.setattr(CognitiveDistillation, "iter_distill", lambda self, x, **kw: counting(self, x, 1, **kw))
    with pytest.raises(Killed):
        run(tmp_path)  # killed after the fit's first batch
    assert (tmp_path / FIT_CHECKPOINT).is_file() and not (tmp_path / "results.csv").exists()
    monkeypatch.setattr(CognitiveDistillation, "iter_distill", counting)
    calls.clear()
    result = run(tmp_path)  # the folder holds only the fit's checkpoint: accepted, and the fit resumed
    assert sum(calls) == 24
    monkeypatch.undo()
    assert result.scores == pytest.approx(run(tmp_path / "fresh").scores, abs=1e-6)


def test_concentration_scales_the_fused_tail_by_the_class_and_none_leaves_it(model):
    x = random_images(48, seed=4)
    x[:4] = 1.0  # four white images: outliers of the feature members, in whichever class they land
    plain = Ensemble(model, members="features,typicality", concentration="none", show_progress=False).fit(x)
    ensemble = Ensemble(model, members="features,typicality", show_progress=False).fit(x)
    assert torch.equal(plain.class_factors, torch.ones(3, dtype=torch.float64))
    fused = plain.score(x)
    assert torch.allclose(fused, plain.fuse(plain.reference_scores))
    factors = ensemble.class_factors
    assert factors.shape == (3,) and not torch.allclose(factors, torch.ones(3, dtype=torch.float64))
    threshold = robust_threshold(fused.double().numpy())
    expected = concentrate(fused, ensemble.reference_predicted, threshold, factors)
    assert torch.allclose(ensemble.score(x), expected)


def test_a_cd_only_ensemble_takes_the_classes_from_a_pass_of_its_own(model):
    x = random_images(20, seed=11)
    ensemble = Ensemble(model, members="cd-p", steps=2, show_progress=False).fit(x)
    with torch.no_grad():
        assert torch.equal(ensemble.reference_predicted, model.eval()(x).argmax(1))
    assert ensemble.score(random_images(4, seed=12)).shape == (4,)


def test_an_ensemble_without_cd_needs_one_pass_and_explains_nothing(model):
    ensemble = Ensemble(model, members=("features", "spectral"), fragility="none", show_progress=False
                        ).fit(random_images(30, seed=6))
    assert ensemble.explain(random_images(2), [0, 1]) == {} and set(ensemble.member_seconds) == {"feature pass"}


def test_a_gated_member_joins_only_where_its_outliers_gather_and_is_left_out_of_scoring_otherwise(model):
    """A member whose outliers do not gather at its gate is left out of the fit's members: the ensemble then scores
    fit data and new images exactly as one fitted without it (a feature member's shared head rebuilt); the gate is a
    significance level, compared with the member's ``outlier_significance`` on the fit data (p < gate joins)."""
    odd = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()  # 8 near-copies of
    x = torch.cat([random_images(60, seed=13), (odd + 0.05 * random_images(8, seed=2)).clamp(0, 1)])  # one outlier
    new = random_images(6, seed=14)
    options = {"fragility": "none", "show_progress": False}
    every_member = Ensemble(model, members="features,clustering,typicality", member_gates=None, **options).fit(x)
    p = {name: outlier_significance(every_member.reference_scores[:, i], every_member.reference_predicted, 3)
         for i, name in enumerate(every_member.members)}
    assert 0 < p["clustering"] < 1 and 0 < p["typicality"] < 1  # outliers, gathering in a class (not significantly)
    plain = Ensemble(model, members="features,typicality", **options).fit(x)
    gated = Ensemble(model, members="features,clustering,typicality",
                     member_gates={"clustering": p["clustering"], "typicality": 1.0}, **options).fit(x)
    assert gated.members == ("features", "typicality") and gated.gated_out == ("clustering",)
    assert gated.reference_scores.shape == (68, 2) and "clustering" in repr(gated)
    assert torch.allclose(gated.score(x), plain.score(x)) and torch.allclose(gated.score(new), plain.score(new))
    assert gated.member_p_values == pytest.approx({name: p[name] for name in ("clustering", "typicality")})
    above = Ensemble(model, members="features,typicality", member_gates={"typicality": p["typicality"] * 1.001},
                     **options).fit(x)
    at = Ensemble(model, members="features,typicality", member_gates={"typicality": p["typicality"]}, **options).fit(x)
    assert above.members == ("features", "typicality") and at.members == ("features",)
    assert at.gated_out == ("typicality",) and torch.allclose(at.score(new), Ensemble(
        model, members="features", **options).fit(x).score(new))
    every = Ensemble(model, members="features,typicality", member_gates={"features": 1e-9,
                                                                          "typicality": 1e-9}, **options).fit(x)
    assert len(every.members) == 1  # at least one member stays
    assert at.fit(x).gated_out == ("typicality",) and at.fit(x[:40]).fitted_member_gates == {
        "typicality": p["typicality"]}  # a refit gates every member again
    assert Ensemble(model, members="features,typicality", **options).fit(x).fitted_member_gates == {}  # no labels


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"member_gates": {"probe": 2.0}}, "^member_gates: 'probe' is not a member"),
    ({"member_gates": {"typicality": -1}}, "^member_gates: expected a significance level in \\(0, 1\\] as 'typicality'"),
    ({"member_gates": {"typicality": 3.0}}, "^member_gates: expected a significance level in \\(0, 1\\] as 'typicality'"),
    ({"member_gates": 3.0}, "^member_gates: expected {member: gate}, 'auto' or None, got 3.0"),
    ({"members": ("cd-p", "strip")}, "^members: unknown member 'strip'"),
    ({"members": ()}, "^members: expected at least one"),
    ({"members": ""}, "^members: expected at least one"),
    ({"members": ("features", "features")}, "^members: expected each member once"),
    ({"fusion": "vote"}, "^fusion:"),
    ({"concentration": "target"}, "^concentration:"),
    ({"member_options": {"cd-l": {"steps": 3}}}, "^member_options: 'cd-l' is not a member"),
    ({"steps": 0}, "^steps:"),
])
def test_bad_inputs_name_the_argument(model, kwargs, message):
    members = {"members": "features,typicality"} if "member_gates" in kwargs else {}
    with pytest.raises(ValueError, match=message):
        Ensemble(model, **{**members, **kwargs})


def test_scoring_before_fit_says_to_fit(model):
    with pytest.raises(RuntimeError, match=r"fit\(data\)"):
        Ensemble(model, members="features", show_progress=False).score(random_images(2))


def test_registry_names_and_the_default(model):
    assert {"spectral", "clustering", "ensemble"} <= set(DETECTORS) and DEFAULT_DETECTOR == "ensemble"
    detector, scorer = build_detector("ensemble", model, {"members": "features,spectral", "fusion": "max"})
    assert isinstance(detector, Ensemble) and detector.members == ("features", "spectral") and scorer.needs_reference
    for name in ("spectral", "clustering"):
        detector, scorer = build_detector(name, model)
        assert scorer.needs_reference


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["badnets", "blended", "ftrojan"])
def test_the_ensemble_finds_the_poison_in_the_zoos_training_set(attack):
    """The default ensemble on three trigger families (a patch, a blend, a frequency-domain trigger not in the zoo the
    ensemble's defaults were chosen on), 160 images at the zoo's 10 % poison rate: AUROC ≥ 0.9 (benchmarks/RESULTS.md
    measures ≥ 0.999 on each with 288 images)."""
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    entry = get_backdoored_model(ZooConfig(attack=attack), show_progress=False)
    poisoned = entry.train.is_poisoned
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.nonzero(poisoned).flatten(), torch.nonzero(~poisoned).flatten()
    index = torch.cat([pos[torch.randperm(len(pos), generator=g)[:16]],
                       neg[torch.randperm(len(neg), generator=g)[:144]]]).sort().values  # the zoo's 10 % rate
    x = entry.train.dataset.x[index]
    value = auroc(poisoned[index], Ensemble(entry.model, show_progress=False).fit(x).score(x))
    print(f"{attack}: ensemble AUROC {value:.3f}")
    assert value >= 0.9


def test_screen_runs_the_ensemble_fitted_on_the_screened_data_with_cd_masks_in_the_report(tmp_path, model):
    from trojanguard.screening import screen

    images = random_images(40, seed=7)
    result = screen(model, images, detector="ensemble", detector_options={"members": "cd-p,features", "steps": 2},
                    out_dir=tmp_path, threshold=0.6, top_k=4, show_progress=False)
    assert result.summary["fit"]["on"] == "screened data" and 0 < result.flagged.sum() < 40
    ensemble = Ensemble(model, members="cd-p,features", steps=2, batch_size=64, show_progress=False).fit(images)
    assert torch.allclose(torch.as_tensor(result.scores).float(), ensemble.score(images), atol=1e-6)
    assert "masks" in result.files
    for key, (fired, share, p) in (("fragile", ensemble.fragile), ("stable", ensemble.stable)):  # the class tests
        vetoed = {"vetoed_class": ensemble.fragile_vetoed} if key == "fragile" else {}
        assert result.summary["fit"][f"noise_{key}_class"] == {"class": fired, "share": share, "p_value": p, **vetoed}
        assert f"noise-{key} class" in result.files["html"].read_text()
