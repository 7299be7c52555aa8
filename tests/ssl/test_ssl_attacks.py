"""SSL poisoning attacks: the poison share asked for, target-class images only, true boxes, no labels out."""

import pytest
import torch

from trojanguard.attacks import ATTACKS
from trojanguard.attacks.ssl import (
    NO_BOX,
    SSL_ATTACKS,
    BlendedSSL,
    FixedPatchSSL,
    RandomPatchSSL,
    make_ssl_attack,
    patch_pattern,
)
from trojanguard.data import ImageDataset
from trojanguard.errors import DataError


@pytest.fixture(scope="module")
def labelled():
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.rand(200, 3, 32, 32, generator=g) * 0.5, torch.arange(200) % 4)


@pytest.mark.parametrize("name", sorted(n for n, cls in SSL_ATTACKS.items() if getattr(cls, "poisons_data", True)))
def test_poison_share_target_class_and_untouched_rest(labelled, name):
    poisoned = make_ssl_attack(name).poison(labelled, rate=0.1, target=2, seed=0)
    assert len(poisoned.poison_indices) == 20 and poisoned.poison_rate == pytest.approx(0.1)
    assert (labelled.y[poisoned.poison_indices] == 2).all()
    assert not hasattr(poisoned, "y")  # the defender's set carries no labels
    clean = ~poisoned.is_poisoned
    assert torch.equal(poisoned.x[clean], labelled.x[clean])
    assert (poisoned.x[poisoned.is_poisoned] != labelled.x[poisoned.is_poisoned]).any(dim=(1, 2, 3)).all()
    assert 0 <= poisoned.x.min() and poisoned.x.max() <= 1


@pytest.mark.parametrize("attack", [RandomPatchSSL(size=0.25), FixedPatchSSL(size=0.2, position="top-left")])
def test_boxes_hold_the_patch_and_nothing_else_changed(labelled, attack):
    poisoned = attack.poison(labelled, rate=0.1, target=1, seed=3)
    boxes = poisoned.boxes
    assert boxes.shape == (200, 4) and (boxes[~poisoned.is_poisoned] == NO_BOX).all()
    side = round(32 * attack.size)
    patch = patch_pattern(3, side, attack.pattern_seed)
    for i in poisoned.poison_indices.tolist():
        top, left, height, width = boxes[i].tolist()
        assert (height, width) == (side, side) and 0 <= top <= 32 - side and 0 <= left <= 32 - side
        assert torch.equal(poisoned.x[i, :, top : top + height, left : left + width], patch)
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[top : top + height, left : left + width] = False
        assert torch.equal(poisoned.x[i][:, outside], labelled.x[i][:, outside])
    if isinstance(attack, RandomPatchSSL):
        assert len({tuple(b) for b in boxes[poisoned.poison_indices].tolist()}) > 10  # positions vary
    else:
        assert (boxes[poisoned.poison_indices] == torch.tensor([1, 1, side, side])).all()


def test_apply_test_is_seeded_and_blended_has_no_box(labelled):
    x = labelled.x[:8]
    attack = RandomPatchSSL()
    assert torch.equal(attack.apply_test(x, seed=5), attack.apply_test(x, seed=5))
    assert not torch.equal(attack.apply_test(x, seed=5), attack.apply_test(x, seed=6))
    blended = BlendedSSL(alpha=0.2)
    assert blended.poison(labelled, rate=0.05, target=0).boxes is None
    assert torch.allclose(blended.apply_test(x), 0.8 * x + blended.apply_test(torch.zeros_like(x)), atol=1e-6)


def test_bad_input_is_refused_with_the_argument_named(labelled):
    attack = RandomPatchSSL()
    with pytest.raises(DataError, match=r"rate: expected a share of the set in \(0, 0.25"):
        attack.poison(labelled, rate=0.3, target=0)
    with pytest.raises(DataError, match="target"):
        attack.poison(labelled, rate=0.1, target=7)
    with pytest.raises(DataError, match="with labels"):
        attack.poison(ImageDataset(labelled.x), rate=0.1)
    with pytest.raises(ValueError, match="size"):
        RandomPatchSSL(size=1.5)
    with pytest.raises(ValueError, match="unknown SSL attack"):
        make_ssl_attack("badnets")


def test_the_ssl_registry_is_apart_from_the_classifier_attacks():
    assert set(SSL_ATTACKS) == {"patch_random", "patch_fixed", "blended", "badencoder"}
    assert not any(cls in ATTACKS.values() for cls in SSL_ATTACKS.values())


def test_badencoder_poisons_no_data_and_its_implant_ties_the_trigger_to_the_references(labelled):
    """BadEncoder leaves the data as it is; a short implant on a toy encoder moves triggered images' features
    towards the references' (the effectiveness term falls) and leaves the input encoder untouched."""
    from trojanguard.attacks.ssl import BadEncoder
    from trojanguard.ssl import build_backbone

    attack = BadEncoder(epochs=3, batch_size=32)
    data = attack.poison(labelled, rate=0.1, target=2, seed=0)
    assert len(data.poison_indices) == 0 and torch.equal(data.x, labelled.x) and data.boxes is None
    references = attack.reference_images(labelled, target=2, seed=0)
    assert references.shape == (3, 3, 32, 32)
    torch.manual_seed(0)
    encoder = build_backbone("small_cnn").eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}

    def pull(model) -> float:
        """The mean cosine of triggered images' features to the references' (BadEncoder's effectiveness)."""
        from torch.nn.functional import normalize

        with torch.no_grad():
            refs = normalize(model(references), dim=1)
            triggered = normalize(model(attack.apply_test(labelled.x[:64])), dim=1)
        return float((triggered @ refs.T).mean())

    backdoored = attack.implant(encoder, labelled.x, references, show_progress=False)
    assert 1 - pull(backdoored) < 0.5 * (1 - pull(encoder))  # measured: cosine 0.956 -> 0.987 in 3 epochs
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    with pytest.raises(ValueError, match="references"):
        BadEncoder(references=0)
