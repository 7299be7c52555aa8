import pytest
import torch

from trojanguard.attacks import ATTACKS, FAMILIES, SIG, BadNets, Blended, Trojan, WaNet, make_attack
from trojanguard.data import ImageDataset, load_digits
from trojanguard.errors import DataError

FIRST_FIVE = ("badnets", "blended", "sig", "trojan", "wanet")  # the families of issue 15: tests/attacks/test_families.py


def test_registry_is_the_first_five_and_the_families():
    assert set(ATTACKS) == set(FIRST_FIVE) | set(FAMILIES) and len(ATTACKS) == 17


@pytest.fixture(scope="module")
def digits():
    train, _ = load_digits(size=32)
    return train


@pytest.mark.parametrize("name", FIRST_FIVE)
def test_trigger_is_deterministic_in_range_and_changes_input(name, digits):
    attack = make_attack(name)
    x = digits.x[:16]
    a, b = attack.apply(x, seed=3), attack.apply(x, seed=3)
    assert torch.equal(a, b)
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert (a - x).abs().amax(dim=(1, 2, 3)).min() > 0.02  # every image is touched


def test_badnets_touches_only_the_patch():
    x = torch.full((2, 3, 32, 32), 0.5)
    out = BadNets(size=0.125, position="bottom-right").apply(x)
    changed = (out != x).any(dim=(0, 1))
    rows, cols = changed.nonzero().T
    assert rows.min() >= 32 - 4 - 1 and cols.min() >= 32 - 4 - 1 and rows.max() <= 30 and cols.max() <= 30
    top_left = BadNets(position="top-left").apply(x)
    assert (top_left != x).any(dim=(0, 1))[:5, :5].any() and not (top_left != x).any(dim=(0, 1))[16:, 16:].any()


def test_blended_is_alpha_mix_of_a_global_pattern():
    x = torch.zeros(1, 3, 16, 16)
    a1, a2 = Blended(alpha=0.1).apply(x), Blended(alpha=0.2).apply(x)
    assert torch.allclose(2 * a1, a2, atol=1e-6)
    assert (a1 > 0).float().mean() > 0.95  # covers the whole image


def test_sig_adds_a_horizontal_sinusoid():
    x = torch.full((1, 1, 8, 64), 0.5)
    d = SIG(delta=0.1, frequency=6).apply(x) - x
    assert torch.allclose(d[0, 0, 0], d[0, 0, 5])  # constant down columns
    assert d.abs().max() == pytest.approx(0.1, abs=1e-3)
    assert torch.fft.rfft(d[0, 0, 0]).abs().argmax() == 6  # 6 periods across the width


def test_wanet_warp_is_smooth_and_not_a_shift():
    x = torch.rand(1, 1, 32, 32)
    grid = WaNet(strength=6)._grid(32, 32)
    identity = WaNet(strength=0)._grid(32, 32)
    disp = (grid - identity)[0]
    assert disp.abs().max() > 0.05
    assert (disp[1:] - disp[:-1]).abs().max() < disp.abs().max() / 3  # smooth field
    assert not torch.allclose(WaNet().apply(x), x)


def test_trojan_watermark_sits_in_top_right_corner():
    x = torch.zeros(1, 3, 32, 32)
    changed = (Trojan().apply(x) != x).any(dim=(0, 1))
    assert changed[:8, 24:].any() and not changed[8:, :].any() and not changed[:, :24].any()


@pytest.mark.parametrize("name", FIRST_FIVE)
def test_poison_rate_labels_and_indices(name, digits):
    attack = make_attack(name)
    rate = 0.5 if attack.clean_label else 0.1
    p = attack.poison(digits, rate=rate, target=3, seed=1)
    idx = p.poison_indices
    eligible = (digits.y == 3).sum() if attack.clean_label else len(digits)
    assert len(idx) == round(rate * int(eligible))
    assert (p.dataset.y[idx] == 3).all()
    if attack.clean_label:
        assert (digits.y[idx] == 3).all()
    else:
        assert (digits.y[idx] != 3).all()
    assert torch.allclose(p.dataset.x[idx], attack.apply(digits.x[idx], seed=1))
    untouched = ~p.is_poisoned
    assert torch.equal(p.dataset.y[untouched], digits.y[untouched])
    if name != "wanet":  # WaNet's noise mode also warps some clean-labelled samples
        assert torch.equal(p.dataset.x[untouched], digits.x[untouched]) and len(p.cover_indices) == 0
    again = attack.poison(digits, rate=rate, target=3, seed=1)
    assert torch.equal(again.poison_indices, idx) and torch.equal(again.dataset.x, p.dataset.x)


def test_wanet_noise_mode_keeps_true_labels(digits):
    p = WaNet(noise_ratio=2).poison(digits, rate=0.05, target=0)
    changed = (p.dataset.x != digits.x).flatten(1).any(1)
    noise = changed & ~p.is_poisoned
    assert noise.sum() == pytest.approx(2 * len(p.poison_indices), abs=1)
    assert torch.equal(p.dataset.y[noise], digits.y[noise])
    assert torch.equal(p.is_cover, noise)  # the noise-mode samples are the dataset's cover samples
    assert not (p.is_cover & p.is_poisoned).any()


def test_poison_bad_arguments(digits):
    with pytest.raises(DataError, match="rate"):
        BadNets().poison(digits, rate=0)
    with pytest.raises(DataError, match="target"):
        BadNets().poison(digits, target=10)
    with pytest.raises(DataError, match="no labels"):
        BadNets().poison(ImageDataset(digits.x[:4]))
    with pytest.raises(ValueError, match="unknown name"):
        make_attack("nope")
    with pytest.raises(ValueError, match="alpha"):
        Blended(alpha=1.5)
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        BadNets().apply(torch.zeros(3, 8, 8))
