"""The source-specific (TaCT-like) attack: who is relabelled, the cover samples, determinism, argument errors, the
ASR over its source classes only; one slow test that implants it in the zoo."""

import pytest
import torch

from trojanguard import metrics
from trojanguard.attacks import SIG, AdaptivePatch, Attack, BadNets, Blended, SourceSpecific, make_attack
from trojanguard.cleanse import Evaluation
from trojanguard.data import load_digits
from trojanguard.errors import DataError

SOURCES = (1, 2, 3)


@pytest.fixture(scope="module")
def digits():
    train, _ = load_digits(size=32)
    return train


def test_only_source_images_are_relabelled_all_to_the_target(digits):
    attack = SourceSpecific()
    p = attack.poison(digits, rate=0.1, target=0, seed=0)
    idx = p.poison_indices
    assert len(idx) == round(0.1 * len(digits))  # rate: a fraction of the whole set
    assert torch.isin(digits.y[idx], torch.tensor(SOURCES)).all() and (p.dataset.y[idx] == 0).all()
    assert set(digits.y[idx].tolist()) == set(SOURCES)  # drawn from every source
    assert torch.equal(p.dataset.y[~p.is_poisoned], digits.y[~p.is_poisoned])  # nobody else relabelled
    assert torch.allclose(p.dataset.x[idx], Blended().apply(digits.x[idx]))  # the base's trigger (Blended)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0, 2.0])
def test_covers_are_triggered_other_class_images_with_their_labels(digits, ratio):
    attack = SourceSpecific(cover_ratio=ratio)
    p = attack.poison(digits, rate=0.05, target=0, seed=0)
    cover = p.cover_indices
    assert len(cover) == round(ratio * len(p.poison_indices))
    assert not torch.isin(digits.y[cover], torch.tensor((0, *SOURCES))).any()  # neither source nor target
    assert torch.equal(p.dataset.y[cover], digits.y[cover])  # labels kept
    assert torch.allclose(p.dataset.x[cover], attack.apply(digits.x[cover]))  # the same trigger
    assert not (p.is_cover & p.is_poisoned).any()
    untouched = ~p.is_cover & ~p.is_poisoned
    assert torch.equal(p.dataset.x[untouched], digits.x[untouched])


def test_poisoning_is_deterministic_for_a_seed(digits):
    attack = SourceSpecific(source_classes=(4, 7))
    a, b = attack.poison(digits, 0.05, 2, seed=3), attack.poison(digits, 0.05, 2, seed=3)
    assert torch.equal(a.dataset.x, b.dataset.x) and torch.equal(a.dataset.y, b.dataset.y)
    assert torch.equal(a.poison_indices, b.poison_indices) and torch.equal(a.cover_indices, b.cover_indices)
    other = attack.poison(digits, 0.05, 2, seed=4)
    assert not torch.equal(a.poison_indices, other.poison_indices)


def test_triggers_like_its_base_and_names_it_in_its_repr(digits):
    x = digits.x[:8]
    assert torch.equal(SourceSpecific(base="badnets").apply(x, seed=2), BadNets().apply(x, seed=2))
    patches = AdaptivePatch()
    assert torch.equal(SourceSpecific(base=patches).apply_test(x), patches.apply_test(x))  # the base's test trigger
    attack = make_attack("tact", source_classes=[6, 5])
    assert isinstance(attack, SourceSpecific) and attack.source_classes == (5, 6)  # one order: one repr, one zoo key
    assert repr(attack) == repr(make_attack("tact", source_classes=(5, 6)))
    assert repr(SourceSpecific()) == \
        "SourceSpecific(base=Blended(alpha=0.2, pattern_seed=0), source_classes=(1, 2, 3), cover_ratio=1.0)"
    assert repr(SourceSpecific(base=Blended(alpha=0.3))) != repr(SourceSpecific())  # the zoo's cache key tells them


@pytest.mark.parametrize("factory, match", [
    (lambda: SourceSpecific(source_classes=()), "source_classes"),
    (lambda: SourceSpecific(source_classes=(1, 1)), "source_classes"),
    (lambda: SourceSpecific(source_classes=(-1,)), "source_classes"),
    (lambda: SourceSpecific(source_classes=3), "source_classes"),
    (lambda: SourceSpecific(cover_ratio=-1), "cover_ratio"),
    (lambda: SourceSpecific(cover_ratio=float("inf")), "cover_ratio"),
    (lambda: SourceSpecific(base=SIG()), "base"),  # clean-label: its poison keeps the target's label
    (lambda: SourceSpecific(base="label_consistent"), "base"),
    (lambda: SourceSpecific(base="nope"), "base"),
    (lambda: SourceSpecific(base=SourceSpecific()), "base"),
])
def test_bad_arguments_raise_one_line_errors_naming_the_argument(factory, match):
    with pytest.raises(DataError, match=f"^{match}: expected") as info:
        factory()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("attack, rate, target, match", [
    (SourceSpecific(), 0.1, 2, "source_classes: expected classes other than the target 2"),
    (SourceSpecific(source_classes=(1, 10)), 0.1, 0, r"source_classes: expected classes of the dataset \(0 … 9\)"),
    (SourceSpecific(source_classes=(1,)), 0.2, 0,
     r"rate: 0.2 asks for 288 poisoned samples but the source classes \(1,\) hold only 151 images"),
    (SourceSpecific(source_classes=tuple(range(1, 9)), cover_ratio=3), 0.1, 0,
     "cover_ratio: 3 asks for 432 cover samples but the classes neither source nor target hold only 150 images"),
])
def test_sources_and_covers_the_dataset_cannot_supply_are_refused_in_one_line(digits, attack, rate, target, match):
    with pytest.raises(DataError, match=f"^{match}") as info:
        attack.poison(digits, rate=rate, target=target)
    assert "\n" not in str(info.value)


class _Fires(torch.nn.Module):
    """Reads the class from the mean pixel (class / 9) and answers 0 for the classes in ``fires``: a backdoor that
    fires on those classes' triggered images only."""

    def __init__(self, fires: tuple[int, ...]):
        super().__init__()
        self.fires = torch.tensor(fires)
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        k = (x.mean(dim=(1, 2, 3)) * 9).round().long()
        return torch.nn.functional.one_hot(torch.where(torch.isin(k, self.fires), 0, k), 10).float()


def test_asr_of_a_source_specific_attack_counts_its_sources_only():
    y = torch.arange(10).repeat(3)
    triggered = (y.float() / 9).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    every_class = _Fires(tuple(range(1, 10)))
    sources_only = _Fires(SOURCES)
    tact = SourceSpecific()
    assert torch.equal(metrics.success_mask(y, 0, tact), torch.isin(y, torch.tensor(SOURCES)))
    assert torch.equal(metrics.success_mask(y, 0, Blended()), y != 0)  # every other attack: the non-target classes
    assert metrics.attack_success_rate(sources_only, triggered, y, 0, tact) == 1.0
    assert metrics.attack_success_rate(sources_only, triggered, y, 0) == pytest.approx(3 / 9)  # the old count
    assert metrics.attack_success_rate(every_class, triggered, y, 0, tact) == 1.0
    assert metrics.attack_success_rate(_Fires((1, 5)), triggered, y, 0, tact) == pytest.approx(1 / 3)
    assert metrics.attack_success_rate(_Fires((1, 5)), triggered, y, 0, Attack()) == pytest.approx(2 / 9)
    # robust accuracy counts the same images: of the sources, those the backdoor leaves alone
    assert metrics.robust_accuracy(_Fires((1, 5)), triggered, y, 0, tact) == pytest.approx(2 / 3)
    assert metrics.robust_accuracy(_Fires((1, 5)), triggered, y, 0) == pytest.approx(7 / 9)
    # Evaluation counts the same images, given the attack or an attack as its trigger
    evaluation = Evaluation(triggered, y, triggered, 0, attack=tact)
    assert evaluation(sources_only)["attack_success_rate"] == 1.0
    assert evaluation(_Fires((1, 5)))["attack_success_rate"] == pytest.approx(1 / 3)
    assert Evaluation(triggered, y, tact, 0).attack is tact
    assert Evaluation(triggered, y, triggered, 0)(sources_only)["attack_success_rate"] == pytest.approx(3 / 9)
    with pytest.raises(ValueError, match="^attack_success_rate: no input counts for SourceSpecific"):
        metrics.attack_success_rate(sources_only, triggered[y > 3], y[y > 3], 0, tact)
    with pytest.raises(ValueError, match="^robust_accuracy: no input counts for SourceSpecific"):
        metrics.robust_accuracy(sources_only, triggered[y > 3], y[y > 3], 0, tact)


def test_asr_with_a_target_among_the_sources_or_an_attack_without_a_trigger_is_refused_in_one_line():
    y = torch.arange(10).repeat(3)
    x = (y.float() / 9).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    for call in (lambda: metrics.success_mask(y, 2, SourceSpecific()),  # a model poisoned with other sources
                 lambda: Evaluation(x, y, SourceSpecific(), 2)):  # refused when built, not at the first epoch
        with pytest.raises(DataError, match=r"^target: expected a class other than the source classes \(1, 2, 3\)"):
            call()
    for call, match in ((lambda: Evaluation(x, y, attack=SourceSpecific()), "without a trigger"),
                        (lambda: Evaluation(x, y, x, 0, attack=object()), "expected an attack")):
        with pytest.raises(DataError, match=f"^Evaluation.attack: .*{match}") as info:
            call()
        assert "\n" not in str(info.value)


def test_the_zoo_builds_a_base_named_by_string_at_its_own_zoo_settings():
    from trojanguard.zoo import ZOO_ATTACK_DEFAULTS, ZooConfig

    attack = ZooConfig(attack="tact", attack_kwargs=(("base", "wanet"),)).make_attack()
    assert attack.base.strength == ZOO_ATTACK_DEFAULTS["wanet"]["strength"]  # not WaNet's class default


@pytest.mark.slow
def test_tact_implants_in_the_zoo_and_stays_source_specific():
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    entry = get_backdoored_model(ZooConfig(attack="tact", poison_rate=0.1), show_progress=False)
    assert entry.clean_accuracy >= 0.95
    assert entry.attack_success_rate >= 0.9  # triggered images of the source classes
    assert entry.other_classes_attack_success_rate <= 0.1  # the other classes keep their labels
    assert entry.evaluation()(entry.model)["attack_success_rate"] == entry.attack_success_rate
