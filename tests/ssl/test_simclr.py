"""SimCLR: NT-Xent against the paper's formula, the two-view augmentation, backbones, and a short training run."""

import math

import pytest
import torch

from trojanguard.errors import DataError
from trojanguard.models import Encoder
from trojanguard.ssl import SimCLRAugmentation, SimCLRConfig, build_backbone, nt_xent, train_simclr

NT_XENT_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # float32 softmax of ≤ 16 similarities against a float64 loop


def nt_xent_by_the_formula(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> float:
    """SimCLR's ℓ(i, j) = −log exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ), averaged over the 2N anchors,
    written as a plain loop in float64."""
    z = torch.cat([z_a, z_b]).double()
    n = len(z_a)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = [float(torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm())) / temperature for k in range(2 * n)]
        total += -sims[j] + math.log(sum(math.exp(s) for k, s in enumerate(sims) if k != i))
    return total / (2 * n)


@pytest.mark.parametrize(("n", "d", "temperature"), [(2, 3, 0.5), (5, 7, 0.1), (8, 16, 1.0)])
def test_nt_xent_matches_the_formula(n, d, temperature):
    g = torch.Generator().manual_seed(n)
    z_a, z_b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    expected = nt_xent_by_the_formula(z_a, z_b, temperature)
    assert nt_xent(z_a, z_b, temperature).item() == pytest.approx(expected, abs=NT_XENT_TOLERANCE["atol"],
                                                                  rel=NT_XENT_TOLERANCE["rtol"])


def test_nt_xent_is_low_for_matching_views_and_rejects_bad_input():
    z = torch.eye(4) * 5
    assert nt_xent(z, z, 0.1) < nt_xent(z, z.roll(1, 0), 0.1)
    with pytest.raises(DataError, match="same shape"):
        nt_xent(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(DataError, match="at least 2"):
        nt_xent(torch.ones(1, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, z, 0.0)


def test_augmentation_shapes_range_and_seeded_determinism():
    x = torch.rand(6, 3, 16, 16)
    x[1] = x[0]
    augment = SimCLRAugmentation(image_size=12)
    view = augment(x, torch.Generator().manual_seed(3))
    assert view.shape == (6, 3, 12, 12) and 0 <= view.min() and view.max() <= 1
    assert torch.equal(view, augment(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(view, augment(x, torch.Generator().manual_seed(4)))
    assert not torch.equal(view[0], view[1])  # per sample: the same image gets its own draws
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(torch.rand(1), expected_next)  # the global generator is left as it was
    assert not SimCLRAugmentation().flip  # digits: no mirrored digits
    with pytest.raises(ValueError, match="crop_scale"):
        SimCLRAugmentation(crop_scale=(0.5, 0.2))


@pytest.mark.parametrize(("arch", "dim"), [("small_cnn", 256), ("resnet18_cifar", 512)])
def test_backbones_give_features(arch, dim):
    backbone = build_backbone(arch).eval()
    assert backbone(torch.rand(2, 3, 16, 16)).shape == (2, dim)
    with pytest.raises(ValueError, match="backbone architecture"):
        build_backbone("vit")


def test_a_short_training_lowers_the_loss_and_returns_the_backbone_as_an_encoder():
    from trojanguard.data import load_digits

    train, _ = load_digits(size=16)
    config = SimCLRConfig(epochs=4, batch_size=32, lr=3e-3, augmentation=SimCLRAugmentation(image_size=16))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 32: a second thread gains little, and stalls when another job holds a core
    try:
        result = train_simclr(train.x[:160], "small_cnn", config, device="cpu", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    losses = [row.loss for row in result.rows]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert isinstance(result.encoder, Encoder) and not result.encoder.training
    assert result.encoder(train.x[:3]).shape == (3, 256)
    assert not any(p is q for p in result.head.parameters() for q in result.encoder.parameters())
    with pytest.raises(DataError, match="data"):
        train_simclr(torch.rand(1, 3, 16, 16), "small_cnn", config, show_progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        SimCLRConfig(batch_size=1)
