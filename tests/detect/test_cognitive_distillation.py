"""Cognitive Distillation: equivalence with an autograd implementation of the recipe, independence of batch
size and order, preprocessing applied alike to every pass, the caller's model left untouched, inputs of every
kind, calibration, and detection power on real backdoored models (AUROC)."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trojanguard.data import ImageDataset
from trojanguard.detect import CognitiveDistillation
from trojanguard.detect.cognitive_distillation import SEED_MIX
from trojanguard.errors import DataError
from trojanguard.metrics import auroc
from trojanguard.models import Normalize, build_model
from trojanguard.ops import mask_from_theta, uniform_noise
from trojanguard.ops.cluster_sweep import full_float32

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(7, 3, 16, 12, generator=torch.Generator().manual_seed(1))


def autograd_masks(model, x, steps, lr, alpha, beta, seed=0, probabilities=False):
    """The recipe written with autograd and torch.optim.Adam, δ from the detector's per-sample streams;
    ``probabilities``: CD-P's distance (total variation between softmax outputs) instead of logit L1."""
    if probabilities:
        logits_model = model
        model = lambda z: torch.softmax(logits_model(z), 1) * 5
    n, c, h, w = x.shape
    seeds = (torch.arange(n) + seed * SEED_MIX) & 0x7FFFFFFF
    theta = torch.ones(n, 1, h, w, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr, betas=(0.1, 0.1), eps=1e-8)
    with torch.no_grad():
        reference = model(x)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        mask = mask_from_theta(theta)
        x_adv = x * mask + (1 - mask) * uniform_noise(seeds, step, c)
        dh = (mask[..., 1:, :] - mask[..., :-1, :]).pow(2).flatten(1).sum(1)
        dw = (mask[..., :, 1:] - mask[..., :, :-1]).pow(2).flatten(1).sum(1)
        loss = (model(x_adv) - reference).abs().mean(1) + alpha * mask.flatten(1).sum(1) + beta * (dh + dw) / (h * w)
        loss.sum().backward()
        optimizer.step()
    return mask_from_theta(theta.detach())


def cd(model, **kwargs):
    """The detector under test, fp32 unless asked (precision='auto' picks bf16 on CPUs with native bf16)."""
    kwargs.setdefault("show_progress", False)
    kwargs.setdefault("precision", "fp32")
    return CognitiveDistillation(model, **kwargs)


def test_masks_match_the_autograd_recipe(net, images):
    """Fused step + input-only gradient = the recipe with autograd on θ (fp32; atol 1e-4 after 8 steps)."""
    expected = autograd_masks(net, images, steps=8, lr=0.1, alpha=0.01, beta=1.0)
    for backend in ("reference", "auto"):
        got = cd(net, mode="logits", steps=8, backend=backend, channels_last=False, fuse_conv_bn=False)
        torch.testing.assert_close(got.distill(images).masks, expected, atol=1e-4, rtol=0)


def test_probability_mode_matches_the_autograd_recipe(net, images):
    """CD-P: γ = 1/(H·W) by default, fast paths on (channels_last, fused conv-BN); atol 1e-4 after 8 steps."""
    expected = autograd_masks(net, images, steps=8, lr=0.1, alpha=1 / (16 * 12), beta=1.0, probabilities=True)
    detector = cd(net, steps=8)
    assert detector.mode == "probabilities"
    torch.testing.assert_close(detector.distill(images).masks, expected, atol=1e-4, rtol=0)


def test_results_do_not_depend_on_batch_size_or_order(net, images):
    """Per-sample noise streams keyed by index: batch size 2 vs 7, fast paths on; atol 1e-4."""
    full = cd(net, steps=12, batch_size=7).distill(images)
    small = cd(net, steps=12, batch_size=2).distill(images)
    torch.testing.assert_close(small.masks, full.masks, atol=1e-4, rtol=0)
    torch.testing.assert_close(small.scores, full.scores, atol=1e-5, rtol=0)


def test_preprocessing_is_applied_to_every_pass(net, images):
    """A model with Normalize inside == the bare model with (mean, std) folded in == with a callable."""
    inside = nn.Sequential(Normalize(MEAN, STD), net).eval()
    norm = Normalize(MEAN, STD)
    expected = autograd_masks(inside, images, steps=6, lr=0.1, alpha=0.01, beta=1.0)
    for preprocess in ((MEAN, STD), norm, lambda z: norm(z)):
        got = cd(net, mode="logits", steps=6, preprocess=preprocess, channels_last=False, fuse_conv_bn=False).distill(images)
        torch.testing.assert_close(got.masks, expected, atol=1e-4, rtol=0)


def test_model_is_left_as_handed_in(net, images):
    model = build_model("small_cnn").train()
    model.head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(m.training) for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    for mode in ("probabilities", "logits", "features"):
        cd(model, mode=mode, steps=2).distill(images)
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_accepts_tensor_dataset_and_dataloader(net, images):
    expected = cd(net, steps=3, batch_size=4).score(images)
    sources = (ImageDataset(images), TensorDataset(images, torch.zeros(7)),
               DataLoader(TensorDataset(images), batch_size=3))
    for source in sources:
        torch.testing.assert_close(cd(net, steps=3, batch_size=4).score(source), expected, atol=1e-5, rtol=0)


def test_result_shapes_and_score_direction(net, images):
    result = cd(net, steps=3, mask_channels=3).distill(images)
    assert result.masks.shape == (7, 3, 16, 12) and result.patterns.shape == (7, 3, 16, 12)
    assert result.l1.shape == (7,) and (result.steps == 3).all()
    torch.testing.assert_close(result.scores, 1 - result.l1 / (3 * 16 * 12))
    torch.testing.assert_close(result.patterns, images * result.masks)


def test_feature_mode_picks_the_last_conv_stage(net, images):
    detector = cd(net, mode="features", steps=2)
    detector.score(images)
    assert detector.layer == "features"
    assert (detector.lr, detector.alpha, detector.beta) == (0.05, 0.001, 10.0)
    named = cd(net, mode="features", layer="features.1", steps=2)
    assert named.score(images).shape == (7,)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        cd(net, mode="features", layer="nope", steps=2).score(images)


def test_bad_inputs_get_clear_errors(net):
    with pytest.raises(DataError, match="cannot take images of shape"):
        cd(net, steps=2).score(torch.rand(2, 1, 16, 16))
    with pytest.raises(DataError, match="values in"):
        cd(net, steps=2).score(torch.rand(2, 3, 8, 8) * 3)
    with pytest.raises(ValueError, match="mode"):
        cd(net, mode="pixels")
    with pytest.raises(DataError, match="mask_channels"):
        cd(net, steps=2, mask_channels=2).score(torch.rand(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match="calibrate"):
        cd(net, steps=2).predict(torch.rand(2, 3, 8, 8))


def test_calibration_controls_false_positives(net):
    clean = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    detector = cd(net, steps=5)
    threshold = detector.calibrate(clean, fpr=0.1)
    assert detector.predict(clean).float().mean() <= 0.1
    sigma = detector.calibrate(clean, rule="sigma", t=0.5)
    scores = detector.score(clean)
    assert sigma == pytest.approx(float(scores.double().mean() + 0.5 * scores.double().std()), rel=1e-6)
    assert threshold != sigma


def test_early_stop_ends_converged_samples(net, images):
    result = cd(net, steps=60, early_stop=0.5).distill(images)
    assert (result.steps < 60).all() and (result.steps % 10 == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["badnets", "blended"])
def test_detects_backdoored_training_samples(attack):
    """Defaults on the zoo model (digits, small CNN): AUROC ≥ 0.9 on every poisoned sample + 100 clean ones."""
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    entry = get_backdoored_model(ZooConfig(attack=attack), show_progress=False)
    poisoned = entry.train.is_poisoned
    clean = torch.nonzero(~poisoned).flatten()[torch.randperm(int((~poisoned).sum()),
                                                               generator=torch.Generator().manual_seed(0))[:100]]
    index = torch.cat([torch.nonzero(poisoned).flatten(), clean])
    scores = CognitiveDistillation(entry.model, show_progress=False).score(entry.train.dataset.x[index])
    assert auroc(poisoned[index], scores) >= 0.9


def test_compiled_network_gives_the_same_masks(net, images):
    """torch.compile plumbing (aot_eager backend: no C++ toolchain needed); atol 1e-4."""
    eager = cd(net, steps=5).distill(images)
    compiled = cd(net, steps=5, compile="aot_eager").distill(images)
    torch.testing.assert_close(compiled.masks, eager.masks, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="compile"):
        cd(net, mode="features", compile=True)


@pytest.mark.gpu
def test_cuda_graphs_replay_gives_the_eager_masks(net, images):
    """The captured step loop (full batches replayed, the short last batch padded) against the eager loop on
    the same GPU, fp32 network, 3 batches of 3, 3 and 1 images; atol 1e-5."""
    model = copy.deepcopy(net).cuda()
    x = images.cuda()
    options = {"steps": 8, "batch_size": 3, "precision": "fp32"}
    eager = cd(model, cuda_graphs=False, **options).distill(x)
    graphed = cd(model, cuda_graphs=True, **options).distill(x)
    torch.testing.assert_close(graphed.masks, eager.masks, atol=1e-5, rtol=0)
    torch.testing.assert_close(graphed.objective, eager.objective, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_and_cpu_agree(net, images):
    """Same per-sample noise streams on both devices: masks agree within fp32 rounding through 8 steps
    (TF32 off; atol 1e-3 covers cuDNN's different summation order)."""
    with full_float32():
        on_gpu = cd(copy.deepcopy(net).cuda(), steps=8, precision="fp32").distill(images.cuda())
    on_cpu = cd(net, steps=8, precision="fp32").distill(images)
    torch.testing.assert_close(on_gpu.masks, on_cpu.masks, atol=1e-3, rtol=0)
