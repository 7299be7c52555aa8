"""BCU (issue 5): the bars on the zoo, re-initialisation by depth on several architectures, the untouched
teacher, the report, determinism and bad input."""

import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trojanguard.cleanse import (
    BCU,
    BCUConfig,
    CleanseError,
    Evaluation,
    distillation_loss,
    layer_ratios,
    temperature_at,
)
from trojanguard.cleanse.augment import NOISE_STD, gaussian_noise, make_augment
from trojanguard.cleanse.bcu import (
    AUTHORS_CLASSIFIER_RATIO,
    AUTHORS_STAGE_RATIOS,
    FAR_EPOCHS,
    FAR_REINIT,
    NEAR_COMPLETE_REINIT,
    NEAR_EPOCHS,
    NEAR_INTACT_PATHS,
    NEAR_REINIT,
    REFERENCE_HAZARD,
    TARGET_HAZARD,
    TARGET_INTACT_PATHS,
    adaptive_scale,
    hazard,
    is_normalisation,
    least_path_hazard,
    reinit_warning,
    reinitialize,
)
from trojanguard.cleanse.distillation import (
    AGREEMENT_KEEP,
    KEEP_MAX_GRAD_NORM,
    batch_statistics_agreement,
    logit_matching_loss,
    normalisation_gap,
    prediction_agreement,
)
from trojanguard.cleanse.unlabeled import VIEWS, View, balanced_subset, choose_view, clean_half, ood_images
from trojanguard.data import load_ood_crops
from trojanguard.errors import DataError
from trojanguard.models import ResNet18, SmallCNN, build_model
from trojanguard.zoo import ZooConfig, cache_dir, get_backdoored_model

# What holds with margin on any machine (issue 13). Issue 5's bars (in-distribution ASR ≤ 5 %, CA drop ≤ 3 points;
# out-of-distribution ASR ≤ 10 %, CA drop ≤ 5 points; < 3 min per model) are benchmarks: the zoo model itself
# changes with the machine (thread count, CPU instruction set), and benchmarks/bcu_seed_spread.py measured over
# 5 zoo × 3 BCU seeds (RESULTS.md, "Seed spread"): in-distribution ASR ≤ 0.030, CA drop ≤ 2.2 points;
# out of distribution BadNets ASR 0.006–0.458 (median 0.086), Blended 0.000–0.115, CA drop ≤ 5.0 points.
# So a test asserts that the backdoor is gone in distribution and mostly gone out of it (before: ASR 1.000).
# Issue 16 chose the in-distribution defaults leave one family out (benchmarks/bcu_families.py; since the eleventh
# session over four teachers, a ResNet-18 among them, with the uniform rule): held out, ASR ≤ 0.05 at a CA drop ≤ 2.2
# points on 50 of 52 cells (the colour filter keeps 0.059 / 0.087 on two small CNNs at seed 0, 0.000 at seed 1), so
# in distribution the issue's own bar is asserted, on families with margin.
# Its far-data defaults (no augmentation, 40 epochs) over the same 5 × 3 seeds: BadNets ASR 0.003–0.625 (median
# 0.015), Blended 0.000–0.057, CA drop ≤ 2.5 points — a tail as long as before, so the out-of-distribution bar stays.
BARS = {"in": (0.05, 0.03), "ood": (0.75, 0.08)}  # (max ASR after, max CA drop)
pytestmark = pytest.mark.filterwarnings("ignore:data. only:UserWarning")  # small test data sets warn


def _images(n: int = 128, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _quick(**kw) -> BCU:
    return BCU(**{"epochs": 1, "batch_size": 32, "show_progress": False, **kw})


# ------------------------------------------------------------------------------------------------- bars


def _run_bar(attack: str, source: str) -> tuple[dict, float, BCU]:
    entry = get_backdoored_model(ZooConfig(attack=attack), show_progress=False)
    data = clean_half(entry) if source == "in" else ood_images(model=entry.model)
    bcu = BCU(show_progress=False, init=lambda: build_model("small_cnn"))
    cleansed = bcu.cleanse(entry.model, data)
    after = Evaluation(entry.test.x, entry.test.y, entry.triggered_test(), entry.config.target)(cleansed)
    return after, entry.clean_accuracy, bcu


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["trojan", "ftrojan", "adaptive_blend"])
def test_in_distribution_bar(attack):
    """Issue 16's bar on three families, each held out when the in-distribution defaults were chosen (benchmarks/
    bcu_families.py, four teachers; measured there on this model: ASR 0.000, CA drop 1.4-1.7 points — the held-out
    table also has the two cells that miss: the colour filter on the small CNNs, ASR 0.059 and 0.087). BadNets'
    row is the demo's (tests/cli)."""
    after, ca_before, bcu = _run_bar(attack, "in")
    max_asr, max_drop = BARS["in"]
    assert after["attack_success_rate"] <= max_asr, after
    assert ca_before - after["clean_accuracy"] <= max_drop, after
    d = bcu.report.details
    assert (d["domain"], d["loss"], d["augment"], d["intact_paths"], d["epochs"], d["rule"]) == (
        "in-distribution", "kl", "none", NEAR_INTACT_PATHS, NEAR_EPOCHS, NEAR_REINIT)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["badnets", "blended"])
def test_out_of_distribution_bar(attack):
    after, ca_before, bcu = _run_bar(attack, "ood")
    max_asr, max_drop = BARS["ood"]
    d = bcu.report.details  # the far-data recipe and its defaults were chosen by BCU itself
    assert (d["domain"], d["augment"], d["epochs"], d["intact_paths"], d["rule"]) == (
        "out-of-distribution", "none", FAR_EPOCHS, TARGET_INTACT_PATHS, FAR_REINIT)
    assert after["attack_success_rate"] <= max_asr, after
    assert ca_before - after["clean_accuracy"] <= max_drop, after


# ------------------------------------------------------------------------------------ re-initialisation


ARCHITECTURES = {
    "small_cnn": lambda: SmallCNN(),
    "resnet18_cifar": lambda: ResNet18(),
    "torchvision:resnet18": lambda: build_model("torchvision:resnet18", num_classes=10),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("rule", ["adaptive", "authors"])
def test_ratios_follow_depth_on_any_architecture(arch, rule):
    model = ARCHITECTURES[arch]()
    layers, unused = layer_ratios(model, _images(2), rule)
    assert not unused
    assert [layer.index for layer in layers] == list(range(len(layers)))
    assert layers[0].depth == 0 and layers[-1].depth == 1
    assert isinstance(dict(model.named_modules())[layers[-1].name], nn.Linear)  # the classifier comes last
    body = [layer.ratio for layer in layers[:-1]]
    assert body == sorted(body), "ratios must not decrease with depth"
    assert all(not is_normalisation(dict(model.named_modules())[layer.name]) for layer in layers)
    expected_stages = {"small_cnn": 4, "resnet18_cifar": 21, "torchvision:resnet18": 21}[arch]
    assert len(layers) == expected_stages


def test_authors_ratios_are_reproduced_on_resnet18():
    layers, _ = layer_ratios(ResNet18(), _images(2), "authors")
    expected = {"conv1": AUTHORS_STAGE_RATIOS[0], "layer1": AUTHORS_STAGE_RATIOS[1], "layer2": AUTHORS_STAGE_RATIOS[2],
                "layer3": AUTHORS_STAGE_RATIOS[3], "layer4": AUTHORS_STAGE_RATIOS[4], "linear": AUTHORS_CLASSIFIER_RATIO}
    for layer in layers:
        assert layer.ratio == expected[layer.name.split(".")[0]], layer
    assert hazard([layer.ratio for layer in layers]) == pytest.approx(REFERENCE_HAZARD)


def _path_hazard(model: nn.Module, layers) -> float | None:
    return least_path_hazard(model, {layer.name: hazard([layer.ratio]) for layer in layers})


@pytest.mark.parametrize("model", [SmallCNN(), ResNet18()], ids=["small_cnn", "resnet18"])
def test_adaptive_reaches_the_target_hazard_with_the_authors_shape(model):
    authors, _ = layer_ratios(model, _images(2), "authors")
    adaptive, _ = layer_ratios(model, _images(2), "adaptive")
    uniform, _ = layer_ratios(model, _images(2), "uniform")
    assert all(a.ratio > b.ratio for a, b in zip(adaptive, authors, strict=True))
    # 1 % of the least-perturbed route intact
    assert _path_hazard(model, adaptive) == pytest.approx(TARGET_HAZARD)
    assert hazard([layer.ratio for layer in uniform]) == pytest.approx(hazard([layer.ratio for layer in adaptive]))
    assert len({layer.ratio for layer in uniform}) == 1
    # same shape: every layer's hazard is the authors' times one factor k
    k = [math.log1p(-a.ratio) / math.log1p(-b.ratio) for a, b in zip(adaptive, authors, strict=True)]
    assert k == pytest.approx([k[0]] * len(k))
    assert all(layer.ratio == 0 for layer in layer_ratios(model, _images(2), "none")[0])


def test_least_path_hazard_follows_the_shortcuts():
    """A chain's least path crosses every layer; a ResNet-18's crosses the stem, the three projection shortcuts
    and the classifier (the identity shortcuts skip every other convolution)."""
    chain = SmallCNN()
    layers, _ = layer_ratios(chain, _images(2), "authors")
    assert _path_hazard(chain, layers) == pytest.approx(hazard([layer.ratio for layer in layers]))
    resnet = ResNet18()
    layers, _ = layer_ratios(resnet, _images(2), "authors")
    route = {"conv1", "layer2.0.shortcut.0", "layer3.0.shortcut.0", "layer4.0.shortcut.0", "linear"}
    expected = hazard([layer.ratio for layer in layers if layer.name in route])
    assert _path_hazard(resnet, layers) == pytest.approx(expected)
    assert expected < 0.3 * hazard([layer.ratio for layer in layers])
    adaptive, _ = layer_ratios(resnet, _images(2), "adaptive")
    assert adaptive_scale(adaptive, resnet) == pytest.approx(TARGET_HAZARD / expected)


def test_adaptive_falls_back_to_the_chain_when_the_model_cannot_be_traced():
    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

        def forward(self, x):
            y = self.a(x)
            if y.mean() > 1e9:
                y = -y
            return self.b(y.mean((2, 3)))

    model = Branchy()
    layers, _ = layer_ratios(model, _images(2), "adaptive")
    assert least_path_hazard(model, {layer.name: 1.0 for layer in layers}) is None
    assert hazard([layer.ratio for layer in layers]) == pytest.approx(TARGET_HAZARD)


def test_adaptive_keeps_the_authors_ratios_on_deep_models():
    deep = nn.Sequential(*[nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)) for _ in range(70)],
                         nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    authors, _ = layer_ratios(deep, _images(2, size=8), "authors")
    adaptive, _ = layer_ratios(deep, _images(2, size=8), "adaptive")
    assert [a.ratio for a in adaptive] == pytest.approx([b.ratio for b in authors])


def test_reinitialise_replaces_the_ratio_of_scalars_and_skips_normalisation():
    model = ResNet18()
    for m in model.modules():  # give batch norm non-default values so a reset would show
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-1, 1)
    layers, _ = layer_ratios(model, _images(2), 0.3)
    student = copy.deepcopy(model)
    reinitialize(student, layers, seed=0)
    before, after = model.state_dict(), student.state_dict()
    for name, module in model.named_modules():
        if is_normalisation(module):
            for key in module.state_dict():
                assert torch.equal(before[f"{name}.{key}"], after[f"{name}.{key}"]), f"{name}.{key} changed"
    big = next(layer for layer in layers if layer.name == "layer4.1.conv2")
    changed = (before["layer4.1.conv2.weight"] != after["layer4.1.conv2.weight"]).float().mean().item()
    assert changed == pytest.approx(0.3, abs=0.01)
    assert big.reinitialised == pytest.approx(0.3 * big.params, rel=0.03)
    # fresh values come from the layer's own initialisation: replaced scalars lie within its bound
    bound = 1 / math.sqrt(512 * 9)
    diff = before["layer4.1.conv2.weight"] != after["layer4.1.conv2.weight"]
    assert after["layer4.1.conv2.weight"][diff].abs().max() <= bound + 1e-6


def test_fresh_values_come_from_the_init_factory():
    model = SmallCNN()
    layers, _ = layer_ratios(model, _images(2), 1.0)
    torch.manual_seed(123)
    reference = SmallCNN()
    student = copy.deepcopy(model)
    calls = []

    def init():
        calls.append(1)
        return copy.deepcopy(reference)

    reinitialize(student, layers, seed=0, init=init)
    assert calls == [1]
    assert torch.equal(student.head.weight, reference.head.weight)
    assert torch.equal(student.features[1][1].weight, model.features[1][1].weight)  # BN kept


def test_plan_on_model_with_unused_and_custom_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.GroupNorm(2, 4)
            self.unused = nn.Linear(5, 5)
            self.scale = nn.Parameter(torch.ones(1))
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x)).mean((2, 3)) * self.scale)

    layers, unused = layer_ratios(Net(), _images(2), "adaptive")
    assert [layer.name for layer in layers] == ["<root>", "conv", "fc"]
    assert unused == ["unused"]


def test_plan_covers_weights_used_functionally_by_their_parent():
    """nn.MultiheadAttention uses its ``out_proj`` without calling it: it is planned right after the attention,
    and both get fresh values without an ``init`` factory (the attention has only ``_reset_parameters``)."""
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 8)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            tokens = self.embed(x.flatten(2).transpose(1, 2))
            return self.head(self.attention(tokens, tokens, tokens, need_weights=False)[0].mean(1))

    model = Attend().eval()
    layers, unused = layer_ratios(model, _images(2), 0.5)
    assert [layer.name for layer in layers] == ["embed", "attention", "attention.out_proj", "head"] and not unused
    student = copy.deepcopy(model)
    assert reinitialize(student, layers, seed=0) == []
    for name in ("in_proj_weight", "out_proj.weight"):
        share = (student.get_parameter(f"attention.{name}") != model.get_parameter(f"attention.{name}")).double().mean()
        assert 0.4 < share < 0.6, (name, share)


# ------------------------------------------------------------------------------- teacher, report, seeds


def test_callers_model_is_untouched_and_report_is_complete():
    model = SmallCNN().train()
    model.features[0][0].weight.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    x, y = _images(64, seed=1), torch.randint(0, 10, (64,))
    bcu = _quick(epochs=3)
    cleansed = bcu.cleanse(model, _images(128), evaluation=Evaluation(x, y, lambda t: t.flip(-1), target=0))
    assert cleansed is not model and not cleansed.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads
    report = bcu.report
    assert [row.epoch for row in report.epochs] == [1, 2, 3]
    assert [row.extras["temperature"] for row in report.epochs] == pytest.approx([2.0, 3.0, 4.0])
    assert all(math.isfinite(row.loss) and row.loss >= 0 for row in report.epochs)
    assert set(report.epochs[-1].metrics) == {"clean_accuracy", "attack_success_rate"}
    assert set(report.before) == set(report.after) == {"clean_accuracy", "attack_success_rate"}
    far = report.details["domain"] == "out-of-distribution"
    assert report.images == 128 and report.details["rule"] == (FAR_REINIT if far else NEAR_REINIT)
    assert len(report.details["layers"]) == 4
    loaded = json.loads(report.to_json())
    assert loaded["method"] == "BCU" and loaded["config"]["epochs"] == 3
    assert "epoch" in report.format() and "after" in report.format()
    assert "reinit='auto'" in repr(bcu)


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_deterministic_for_a_seed_and_accepts_datasets_and_loaders():
    model, data = SmallCNN(), _images(128)
    a, a2, c = (_quick(seed=seed).cleanse(model, data) for seed in (3, 3, 4))
    assert _same(a, a2) and not _same(a, c)
    labelled = TensorDataset(data, torch.zeros(128, dtype=torch.long))  # labels are ignored
    assert _same(_quick(seed=3).cleanse(model, labelled), _quick(seed=3).cleanse(model, labelled))
    bcu = _quick()
    bcu.cleanse(model, DataLoader(TensorDataset(data), batch_size=32, shuffle=True))
    assert bcu.report.images == 128


def test_without_augmentation_the_teacher_answers_each_image_once_and_trains_the_same_student():
    """Without augmentation the teacher's answers are computed once per image (AnsweredImages), not per epoch;
    the student is the one a per-batch teacher gives (an identity callable keeps BCU on that path), up to the
    float rounding of other batch sizes."""
    model, data = SmallCNN(), _images(128)
    calls = []
    def count(_module, args, _out):  # copies carry the hook: no-grad calls on a training batch are the teacher's
        if not torch.is_grad_enabled() and len(args[0]) == 32:
            calls.append(1)

    handle = model.register_forward_hook(count)
    try:
        cached = _quick(epochs=3, augment="none").cleanse(model, data)  # batches of 32
        cached_calls = len(calls)
        per_batch = _quick(epochs=3, augment=lambda x: x).cleanse(model, data)
    finally:
        handle.remove()
    assert cached_calls == 0 and len(calls) >= 3 * 128 // 32
    for p, q in zip(cached.state_dict().values(), per_batch.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


def _calibrated_cnn(x: torch.Tensor) -> SmallCNN:
    """A SmallCNN whose batch-norm running statistics are those of ``x`` (as after training on it)."""
    model = SmallCNN()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def _smooth(n: int, seed: int, size: int = 32, grid: int = 4) -> torch.Tensor:
    """Structured images: bilinear upsampling of ``grid``×``grid`` noise (shuffling their pixels destroys it)."""
    low = torch.rand(n, 3, grid, grid, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _quadrant_cnn(x: torch.Tensor, steps: int = 60) -> SmallCNN:
    """A SmallCNN trained on ``x`` to name its brightest quadrant (4 classes): predictions that depend on the
    features, as a trained model's do (an untrained one predicts one class whatever batch norm does)."""
    torch.manual_seed(0)
    y = torch.nn.functional.adaptive_avg_pool2d(x.mean(1), 2).flatten(1).argmax(1)
    model = SmallCNN(num_classes=4, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        batch = slice(64 * (step % (len(x) // 64)), 64 * (step % (len(x) // 64) + 1))
        loss = torch.nn.functional.cross_entropy(model.train()(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_batch_statistics_agreement_separates_near_and_far_data_and_picks_the_recipe():
    near = _smooth(256, seed=1) * 0.5  # dark smooth images, like the training data below
    model = _quadrant_cnn(_smooth(512, seed=2) * 0.5)
    far = 1 - _smooth(256, seed=3) * 0.2  # bright images: another distribution
    before = copy.deepcopy(model.state_dict())
    assert batch_statistics_agreement(model, near) >= AGREEMENT_KEEP > batch_statistics_agreement(model, far)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running statistics untouched
    assert not model.training
    assert normalisation_gap(model, near) < normalisation_gap(model, far)
    no_norm = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    assert batch_statistics_agreement(no_norm, near) is None and normalisation_gap(no_norm, near) is None
    for data, rule, recipe in [
            (near, NEAR_REINIT, ("in-distribution", "update", "kl", None, "none", NEAR_INTACT_PATHS)),
            (far, FAR_REINIT, ("out-of-distribution", "keep", "mse", KEEP_MAX_GRAD_NORM, "none", TARGET_INTACT_PATHS))]:
        bcu = _quick()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bcu.cleanse(model, data)
        d = bcu.report.details
        assert (d["domain"], d["norm_stats"], d["loss"], d["max_grad_norm"], d["augment"], d["intact_paths"]) == recipe
        expected = layer_ratios(model, data[:2], rule, recipe[-1])[0]
        assert d["rule"] == rule
        assert [layer["ratio"] for layer in d["layers"]] == pytest.approx([layer.ratio for layer in expected])
        assert d["adaptive_scale"] == pytest.approx(adaptive_scale(expected, model, -math.log(recipe[-1])))
        far_warned = [w for w in d["warnings"] if "out-of-distribution for this model" in w]
        assert len(far_warned) == (data is far)  # the user is told that far data cleanses less reliably
        assert any(str(c.message) == w for c in caught for w in far_warned) == (data is far)
        assert all(f"warning: {w}" in bcu.report.format() for w in d["warnings"])
    bcu = _quick(norm_stats="update", loss="kl", max_grad_norm=None, augment="crop", intact_paths=0.05)  # explicit
    bcu.cleanse(model, far)                                                                            # choices win
    d = bcu.report.details
    assert (d["norm_stats"], d["loss"], d["augment"], d["intact_paths"]) == ("update", "kl", "crop", 0.05)


def test_batch_statistics_agreement_leaves_dropout_off():
    """Only batch norm changes mode: a dropout layer in train mode would change predictions on any data."""
    x = _smooth(128, seed=1) * 0.5
    cnn = _quadrant_cnn(_smooth(512, seed=2) * 0.5)
    model = nn.Sequential(cnn.features, cnn.pool, nn.Flatten(), nn.Dropout(0.9), cnn.head)
    assert batch_statistics_agreement(model.eval(), x) >= AGREEMENT_KEEP


@pytest.mark.slow
def test_batch_statistics_agreement_separates_the_zoo_data_sources():
    """Forward passes only: held-out training images are near, adapted and raw photo crops far (small CNN)."""
    entry = get_backdoored_model(ZooConfig(attack="badnets"), show_progress=False)
    near = batch_statistics_agreement(entry.model, clean_half(entry)[:256])
    adapted = batch_statistics_agreement(entry.model, ood_images(256, model=entry.model, pool_factor=2))
    raw = batch_statistics_agreement(entry.model, load_ood_crops(n=256, size=32, channels=3, seed=0).x)
    assert near >= AGREEMENT_KEEP > max(adapted, raw), (near, adapted, raw)


RESNET18_16PX = [ZooConfig(attack=attack, arch="resnet18_cifar", image_size=16) for attack in ("badnets", "blended")]


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    pytest.param(c, id=c.attack, marks=pytest.mark.skipif(
        not (cache_dir() / c.key() / "model.safetensors").is_file(),
        reason=f"needs the cached ResNet-18 {c.attack} zoo model (16 px digits; ~8 min to train on 2 CPU cores)"))
    for c in RESNET18_16PX])
def test_batch_statistics_agreement_does_not_misfire_on_resnet18(config):
    """Both earlier switches misfired on this ResNet-18: the absolute gap of held-out training images is 0.2 (BadNets;
    over the old threshold), and Blended's shuffled-pixel reference is small (its trigger is noise), so the
    relative gap of its held-out images was 0.10. The agreement puts both with the in-distribution data."""
    entry = get_backdoored_model(config, show_progress=False)
    near = batch_statistics_agreement(entry.model, clean_half(entry)[:256])
    edges = View("edges", blur=2)(load_ood_crops(n=256, size=16, channels=3, seed=0).x)  # the view ood_images picks
    assert near >= AGREEMENT_KEEP > batch_statistics_agreement(entry.model, edges)


def test_a_plan_that_replaces_nearly_every_weight_is_reported():
    """reinit=1.0 (as the uniform rule gives a ViT-B/16) leaves a fresh model: the report says so; the default plan
    on the small CNN (79 % of the weights) does not warn."""
    model = _calibrated_cnn(_images(256, seed=2) * 0.5)
    bcu = _quick(reinit=1.0, epochs=1)
    with pytest.warns(UserWarning, match=r"replaced 100\.0 % of the weights"):
        bcu.cleanse(model, _images(128, seed=3) * 0.5)
    assert any("close to a fresh model" in w for w in bcu.report.details["warnings"])
    plan = BCU().plan(SmallCNN(), _images(2))  # in distribution: uniform
    assert sum(layer.ratio * layer.params for layer in plan) / sum(layer.params for layer in plan) < NEAR_COMPLETE_REINIT
    assert reinit_warning(0.9, 100) is None and "100 unlabeled images" in reinit_warning(0.96, 100)


def test_kept_statistics_are_unchanged_after_cleansing():
    model = _calibrated_cnn(_images(256, seed=2) * 0.5)
    cleansed = _quick(norm_stats="keep", epochs=2).cleanse(model, 1 - _images(256, seed=3) * 0.2)
    for (name, a), b in zip(model.named_buffers(), cleansed.buffers(), strict=True):
        if "running" in name:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("source", ["photos", "dead_leaves", "fractal", "strokes", "photos+strokes"])
def test_ood_images_are_adapted_to_the_model_and_class_balanced(source):
    torch.manual_seed(0)
    model = SmallCNN()
    info: dict = {}
    x = ood_images(120, model=model, pool_factor=3, info=info, source=source)
    assert x.shape == (120, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert info["source"] == source and info["view"] in {str(v) for v in VIEWS} and info["pool"] == 360
    assert info["view_entropy"][info["view"]] == max(info["view_entropy"].values())
    assert len(ood_images(50, channels=1, model=SmallCNN(in_channels=1), pool_factor=2)[0]) == 1
    with pytest.raises(DataError, match="3 input channels"):
        ood_images(50, channels=1, model=model, pool_factor=2)
    with pytest.raises(DataError, match="source: expected one of photos, dead_leaves, fractal, strokes, photos\\+strokes, got 'noise'"):
        ood_images(50, source="noise")


def test_view_rules_pick_the_most_even_spread_or_the_least_normalisation_gap():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    crops = load_ood_crops(64, size=32, seed=1).x
    by_entropy, entropy = choose_view(model, crops)
    assert entropy[str(by_entropy)] == max(entropy.values())
    by_gap, entropy_too = choose_view(model, crops, rule="gap")
    assert entropy_too == entropy  # the entropies are reported whatever the rule
    with torch.no_grad():
        gaps = {str(v): normalisation_gap(model, v(crops)) for v in VIEWS}
    assert gaps[str(by_gap)] == min(gaps.values())
    info: dict = {}
    ood_images(40, model=model, pool_factor=2, info=info, view_rule="gap")
    assert info["view_rule"] == "gap" and info["view"] == str(choose_view(model, load_ood_crops(80, seed=0).x[:256],
                                                                          rule="gap")[0])
    no_norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ValueError, match="view_rule: 'gap' needs a model with batch-norm running statistics"):
        choose_view(no_norm, crops, rule="gap")
    with pytest.raises(ValueError, match="view_rule: expected one of entropy, gap, got 'best'"):
        ood_images(10, view_rule="best")


def test_balanced_subset_takes_classes_round_robin():
    classes = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    taken = balanced_subset(classes, 40)
    assert torch.bincount(classes[taken]).tolist() == [18, 17, 5]
    assert len(set(taken.tolist())) == 40 and taken.tolist() == sorted(taken.tolist())
    with pytest.raises(DataError, match="pool of 85"):
        balanced_subset(classes, 86)


def test_temperature_ramp_and_loss_are_the_authors():
    assert [temperature_at(e, 4, (1, 4)) for e in range(4)] == [1.75, 2.5, 3.25, 4.0]
    t, s = torch.randn(8, 10), torch.randn(8, 10)
    p, log_q = torch.softmax(t / 2, 1), torch.log_softmax(s / 2, 1)
    expected = (p * (p.log() - log_q)).sum(1).mean()
    assert distillation_loss(s, t, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(t, t, 3.0).item() == pytest.approx(0, abs=1e-6)
    assert logit_matching_loss(s, t, 2.0).item() == pytest.approx(((s - t) ** 2).mean().item())


# ---------------------------------------------------------------------------------------------- bad input


def test_data_that_does_not_fit_the_model_is_named_before_training():
    with pytest.raises(DataError, match=r"shape \(1, 32, 32\).*3 input channels"):
        _quick().cleanse(SmallCNN(), _images(128, channels=1))
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(DataError, match=r"shape \(3, 16, 16\).*3072 input features"):
        _quick().cleanse(flat, _images(128, size=16))
    with pytest.raises(DataError, match="logits"):
        _quick().cleanse(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1), nn.Flatten(0)), _images(128))


def test_empty_tiny_and_wrong_data():
    with pytest.raises(DataError, match="0 image"):
        _quick().cleanse(SmallCNN(), _images(0))
    with pytest.raises(DataError, match="at least 100"):
        _quick().cleanse(SmallCNN(), _images(50))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        _quick().cleanse(SmallCNN(), _images(128) * 255)
    with pytest.raises(DataError, match="expected a tensor"):
        _quick().cleanse(SmallCNN(), [1, 2, 3])
    with pytest.raises(DataError, match="at least 100"):  # a loader whose size is only known after an epoch
        _quick().cleanse(SmallCNN(), DataLoader(_Stream(), batch_size=10))
    with pytest.warns(UserWarning, match="only 128"):
        _quick().cleanse(SmallCNN(), _images(128))


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(_images(40))


def test_model_on_unusable_device():
    with pytest.raises(CleanseError, match="meta"):
        _quick().cleanse(SmallCNN().to("meta"), _images(128))
    mixed = SmallCNN()
    mixed.head.to("meta")
    with pytest.raises(CleanseError, match="several devices"):
        _quick().cleanse(mixed, _images(128))


def test_nan_is_a_clear_error_and_no_model_is_returned():
    broken = SmallCNN()
    with torch.no_grad():
        broken.head.bias[0] = float("nan")
    bcu = _quick()
    with pytest.raises(CleanseError, match="NaN"):
        bcu.cleanse(broken, _images(128))
    assert bcu.report is None
    with pytest.raises(CleanseError, match="diverged"):
        _quick(lr=1e12, reinit="none").cleanse(SmallCNN(), _images(128))


def test_config_is_frozen_and_holds_bcus_defaults():
    config = BCUConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]
    bcu = BCU()
    assert bcu.config == config and all(getattr(bcu, f.name) == getattr(config, f.name)
                                        for f in dataclasses.fields(BCUConfig))
    assert (config.reinit, config.intact_paths, config.epochs, config.lr, config.batch_size, config.temperature,
            config.augment) == ("auto", "auto", "auto", 0.01, 64, (1.0, 4.0), "none")
    assert all(f.metadata.get("help") for f in dataclasses.fields(BCUConfig))
    with pytest.raises(AttributeError, match="epochs"):
        bcu.epochs = 3


def test_config_keyword_and_settings_build_the_same_cleanser():
    from_settings = BCU(epochs=3, lr=0.1, temperature=(2, 4))
    from_config = BCU(config=BCUConfig(epochs=3, lr=0.1, temperature=(2, 4)))
    assert from_settings.config == from_config.config and repr(from_settings) == repr(from_config)
    assert from_settings.temperature == (2.0, 4.0)
    assert BCU(config=BCUConfig(epochs=3), seed=5).config == BCUConfig(epochs=3, seed=5)
    with pytest.raises(TypeError, match="epoch"):
        BCU(epoch=3)
    with pytest.raises(TypeError, match="BCUConfig"):
        BCU(config={"epochs": 3})
    with pytest.raises(ValueError, match="epochs"):
        BCUConfig(epochs=0)


def test_repr_and_report_config_list_every_field():
    bcu = BCU(reinit=[0.1, 0.2], init=SmallCNN, show_progress=False)
    names = [f.name for f in dataclasses.fields(BCUConfig)]
    assert repr(bcu) == "BCU(" + ", ".join(f"{n}={getattr(bcu.config, n)!r}" for n in names) + ")"
    config = bcu.report_config()
    assert list(config) == [n for n in names if n != "show_progress"]  # a display choice, not a hyperparameter
    assert config["reinit"] == "[0.1, 0.2]" and config["init"] == repr(SmallCNN) and config["temperature"] == (1.0, 4.0)
    json.dumps(config)


def test_hyperparameters_are_validated():
    for kwargs, match in [({"reinit": "sideways"}, "reinit"), ({"reinit": 1.5}, "reinit"), ({"epochs": 0}, "epochs"),
                          ({"lr": -1.0}, "lr"), ({"batch_size": 1}, "batch_size"), ({"temperature": (0, 4)}, "temperature"),
                          ({"augment": "rotate"}, "augment"), ({"intact_paths": 1.0}, "intact_paths"),
                          ({"intact_paths": "none"}, "intact_paths"), ({"loss": "l1"}, "loss"),
                          ({"norm_stats": "freeze"}, "norm_stats"), ({"max_grad_norm": 0}, "max_grad_norm")]:
        with pytest.raises(ValueError, match=match):
            BCU(**kwargs)
    with pytest.raises(ValueError, match="expected 4 ratios"):
        _quick(reinit=[0.1, 0.2]).cleanse(SmallCNN(), _images(128))


def test_warns_when_the_teacher_sends_most_data_to_one_class():
    biased = SmallCNN()
    with torch.no_grad():
        biased.head.bias[3] = 50.0
    bcu = _quick()
    with pytest.warns(UserWarning, match="class 3"):
        bcu.cleanse(biased, _images(128))
    assert bcu.report.details["teacher_class_share"][3] == 1.0
    assert any("class 3" in w for w in bcu.report.details["warnings"])


def test_report_says_what_it_measured_without_labels_and_what_to_do():
    model, data = SmallCNN(), _images(128)
    bcu = _quick(reinit="none", lr=1e-6, norm_stats="keep")  # the student stays the teacher
    bcu.cleanse(model, data)
    details = bcu.report.details
    assert details["teacher_student_agreement"] == 1.0
    assert details["notes"] and details["notes"][0].startswith("not verified")
    assert "trojanguard screen" in details["notes"][0] and "note: not verified" in bcu.report.format()
    biased = SmallCNN()
    with torch.no_grad():
        biased.head.bias[3] = 50.0  # every image to class 3
    teacher_classes = model(data).argmax(1)
    assert prediction_agreement(biased, model, data) == pytest.approx(float((teacher_classes == 3).double().mean()))
    bcu.cleanse(model, data, evaluation=Evaluation(data[:32], torch.ones(32, dtype=torch.long), lambda t: t, 0))
    assert "notes" not in bcu.report.details  # measured with labels: nothing to caution about


class _BorderTeacher(nn.Module):
    """Class 1 when the image's outer ring holds zero pixels (the border a zero-padded crop adds), else class 0:
    a teacher whose 'backdoor' is evoked by BCU's own augmentation (issue 16)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0, 5.0], [40.0, 0.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        ring = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=-1)
        zero = (ring == 0).float().mean(dim=(1, 2))
        return self.head(torch.stack([zero, torch.ones_like(zero)], 1))


@pytest.mark.parametrize("view_target", ["view", "source", "consistent", "auto"])
def test_view_target_keeps_an_augmentation_from_evoking_the_teachers_backdoor(view_target):
    x = 0.1 + 0.9 * _images(256)  # no zero pixel: the teacher answers class 0 on every source image
    teacher = _BorderTeacher()
    bcu = BCU(epochs=4, batch_size=32, lr=0.1, reinit=1.0, augment="crop", view_target=view_target, show_progress=False)
    student = bcu.cleanse(teacher, x)
    details = bcu.report.details
    assert details["view_prediction_change"] > 0.9  # label-free: nearly every crop changes the teacher's answer
    assert details["view_class_gain"] > 0.9  # ... and moves it into one class
    if view_target == "auto":  # so auto has the teacher answer on the source
        assert details["view_target"] == "source"
        view_target = "source"
    views = torch.stack([torch.nn.functional.pad(img, (4, 0, 0, 0))[..., :32] for img in x[:64]])  # 4-px shift
    with torch.no_grad():
        evoked = float((student(views).argmax(1) == 1).double().mean())
    if view_target == "view":  # the authors' step: the teacher's answer on the crop is taught
        assert details["teacher_class_share"][1] > 0.9 and evoked > 0.9
    else:  # the teacher's answer on the source (or no answer that differs from it) is taught
        assert details["teacher_class_share"][1] < (0.05 if view_target == "source" else 1.0) and evoked < 0.1


def test_auto_view_target_keeps_the_authors_view_when_augmenting_moves_no_class():
    x = 0.1 + 0.9 * _images(256)
    x[..., :4, :] = 0.0  # a zero band already: the teacher answers class 1 on the sources, and on every crop
    bcu = BCU(epochs=1, batch_size=32, augment="crop", show_progress=False)
    bcu.cleanse(_BorderTeacher(), x)
    assert bcu.report.details["view_class_gain"] <= 0.05 and bcu.report.details["view_target"] == "view"
    bcu = BCU(epochs=1, batch_size=32, augment="none", show_progress=False)
    bcu.cleanse(_BorderTeacher(), x)
    assert bcu.report.details["view_class_gain"] is None and bcu.report.details["view_target"] == "view"


class _RoughnessTeacher(nn.Module):
    """Class 1 when neighbouring pixels differ a lot (mean absolute difference above 0.06), else class 0: a teacher
    whose 'backdoor' is an additive noise-like pattern, as a blend trigger is."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0, 0.0], [40.0, 0.0]]))
            self.head.bias.copy_(torch.tensor([0.0, -2.4]))

    def forward(self, x):
        rough = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
        return self.head(torch.stack([rough, torch.ones_like(rough)], 1))


@pytest.mark.parametrize("view_target", ["auto", "view"])
def test_noise_augmentation_teaches_the_teachers_clean_answer_under_noise(view_target):
    x = _smooth(256, seed=0)  # smooth: the teacher answers class 0 on every source image, class 1 on noisy ones
    teacher = _RoughnessTeacher()
    bcu = BCU(epochs=4, batch_size=32, lr=0.1, reinit=1.0, augment="noise", view_target=view_target,
              show_progress=False)
    student = bcu.cleanse(teacher, x)
    details = bcu.report.details
    assert details["view_class_gain"] > 0.9  # noise moves nearly every image into the teacher's class 1 ...
    noisy = gaussian_noise(_smooth(64, seed=1), torch.Generator().manual_seed(2))
    with torch.no_grad():
        evoked = float((student(noisy).argmax(1) == 1).double().mean())
    if view_target == "auto":  # ... so auto has the teacher answer on the source, and noise is not learnt as class 1
        assert details["view_target"] == "source" and evoked < 0.1
    else:
        assert details["view_target"] == "view" and evoked > 0.9


def test_gaussian_noise_is_reproducible_clipped_and_of_the_stated_size():
    x = torch.full((8, 3, 16, 16), 0.5, dtype=torch.float64)
    a, b = gaussian_noise(x, torch.Generator().manual_seed(3)), gaussian_noise(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == x.dtype and a.shape == x.shape
    assert float((a - x).std()) == pytest.approx(NOISE_STD, rel=0.05)  # 6 144 draws: ±5 % holds with margin
    edges = gaussian_noise(torch.ones(4, 1, 8, 8), torch.Generator().manual_seed(0))
    assert float(edges.max()) <= 1.0 and float(edges.min()) < 1.0
    assert make_augment("noise") is gaussian_noise


@pytest.mark.parametrize("attack", ["adaptive_blend", "badnets"])
def test_clean_half_leaves_out_the_attacks_cover_samples(attack):
    from types import SimpleNamespace

    from trojanguard.data import load_digits

    config = ZooConfig(attack=attack)
    train, _ = load_digits(size=config.image_size, seed=config.seed)
    poisoned = config.make_attack().poison(train, rate=config.rate(config.make_attack()), target=config.target,
                                           seed=config.seed)
    entry = SimpleNamespace(config=config, train=poisoned)
    kept, before = clean_half(entry), clean_half(entry, untouched=False)
    clean_images = {img.numpy().tobytes() for img in train.x}
    assert all(img.numpy().tobytes() in clean_images for img in kept)  # no trigger-carrying image
    if attack == "badnets":  # no cover samples: the data is what it was
        assert torch.equal(kept, before)
    else:  # covers (true label, partial trigger) were in the half before, and only they are gone
        assert 0 < len(before) - len(kept) < 0.2 * len(before)
