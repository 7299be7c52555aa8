"""Issue 13, model files: compiled models (TorchScript, torch.export) work where the operation can run and are
refused in one line where it cannot; corrupt, empty and foreign files and non-finite weights get one clear line."""

from __future__ import annotations

import csv
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trojanguard.cleanse import BCU
from trojanguard.cleanse.base import CleanseError, UnlabeledImages
from trojanguard.cleanse.distillation import DistillSettings, distill
from trojanguard.detect import CognitiveDistillation, FeatureMahalanobis
from trojanguard.errors import DataError, ModelLoadError
from trojanguard.guard import Guard, GuardSession, export_onnx
from trojanguard.models import (
    Classifier,
    CompiledModel,
    Encoder,
    as_classifier,
    as_encoder,
    as_image_text,
    build_model,
    load_model,
    save_model,
)

SIDE = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small untrained CNN saved as safetensors, weights-only .pt, TorchScript and .pt2 (batch 2), the same CNN
    with one NaN weight, a few broken files, and 8 images as an npz."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=3).eval()
    paths = {"safetensors": save_model(model, folder / "model.safetensors"), "pt": save_model(model, folder / "model.pt")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(folder / "scripted.pt"))
    paths["torchscript"] = folder / "scripted.pt"
    paths["pt2"] = folder / "exported.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(2, 3, SIDE, SIDE),)), str(paths["pt2"]))
    broken = build_model("small_cnn", num_classes=10, in_channels=3)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.features[1][0].weight[0, 0, 0, 0] = math.inf
    paths["inf.pt"] = save_model(broken, folder / "inf.pt")
    with torch.no_grad():
        broken.features[1][0].weight[0, 0, 0, 0] = math.nan
    paths["nan"] = save_model(broken, folder / "nan.safetensors")
    safetensors, pt = paths["safetensors"].read_bytes(), paths["pt"].read_bytes()
    for name, content in {
        "truncated.safetensors": safetensors[: len(safetensors) // 2], "empty.safetensors": b"",
        "fake.safetensors": b"this is not a safetensors file", "notzip.pt2": b"not a zip archive",
        "truncated.pt2": paths["pt2"].read_bytes()[:1000], "truncated.pt": pt[: len(pt) // 2],
        "image.png": b"\x89PNG\r\n\x1a\n" + bytes(64), "guard.onnx": b"\x08\x08\x12\x07pytorch" + bytes(32),
    }.items():
        paths[name] = folder / name
        paths[name].write_bytes(content)
    x = (np.random.default_rng(0).random((8, SIDE, SIDE, 3)) * 255).astype(np.uint8)
    paths["data"] = folder / "data.npz"
    np.savez(paths["data"], x=x)
    return paths, model


def _scores(results_csv):
    with open(results_csv, newline="") as f:
        return {row["id"]: float(row["score"]) for row in csv.DictReader(line for line in f if not line.startswith("#"))}


# ------------------------------------------------------------------------------------------ compiled models
@pytest.mark.parametrize("kind", ["torchscript", "pt2"])
def test_compiled_model_screens_like_its_state_dict(files, kind, cli, tmp_path):
    """CD needs forward + input gradient only: a compiled copy gives the state dict's scores; the features
    detector and the ensemble run on its output (a .pt2 exported at batch 2 serves batches of 8 through chunking)."""
    paths, _ = files
    common = ("--data", paths["data"], "--threshold", "1", "--no-report")
    reference = cli("screen", "--model", paths["safetensors"], "--arch", "small_cnn", "--detector", "cd",
                    "--steps", "3", "--out", tmp_path / "sd", *common)
    compiled = cli("screen", "--model", paths[kind], "--detector", "cd", "--steps", "3", "--out", tmp_path / kind,
                   *common)
    assert reference.code == 0 and compiled.code == 0, compiled.err
    expected, got = _scores(tmp_path / "sd" / "results.csv"), _scores(tmp_path / kind / "results.csv")
    assert got.keys() == expected.keys() and len(got) == 8
    assert all(got[k] == pytest.approx(expected[k], rel=1e-4, abs=1e-6) for k in got)
    for detector in ("features", "ensemble"):  # the ensemble's feature members too read the logits
        result = cli("screen", "--model", paths[kind], "--detector", detector, "--steps", "3", "--out",
                     tmp_path / detector, *common) if detector == "ensemble" else \
            cli("screen", "--model", paths[kind], "--detector", detector, "--out", tmp_path / detector, *common)
        assert result.code == 0, result.err
        assert len(_scores(tmp_path / detector / "results.csv")) == 8


def test_compiled_model_uses_the_logits_as_features_and_stays_frozen(files):
    paths, model = files
    compiled = load_model(paths["pt2"])
    assert isinstance(compiled, CompiledModel) and not compiled.training
    compiled.train()  # only the flag: the exported program cannot switch mode
    compiled.eval().requires_grad_(False)
    with pytest.raises(RuntimeError, match="cannot be trained"):
        compiled.requires_grad_(True)
    x = torch.rand(5, 3, SIDE, SIDE)
    torch.testing.assert_close(compiled(x), model(x))
    # a compiled model has no inner layer for the typicality prefilter: the same fit as without one
    on_logits = FeatureMahalanobis(model, layer="", typical_layer=None, show_progress=False).fit(x)
    detector = FeatureMahalanobis(compiled, show_progress=False).fit(x)
    assert detector.typical.all()
    torch.testing.assert_close(detector.score(x), on_logits.score(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot be hooked"):
        FeatureMahalanobis(compiled, layer="program.features")
    cd = CognitiveDistillation(load_model(paths["torchscript"]), steps=2, show_progress=False)
    assert torch.isfinite(cd.score(x)).all()


def test_compiled_model_names_the_input_shape_it_takes(files):
    compiled = load_model(files[0]["pt2"])
    with pytest.raises(ValueError, match=r"exported\.pt2.*\(N, 3, 32, 32\), got \(2, 3, 16, 16\)"):
        compiled(torch.rand(2, 3, 16, 16))


def test_export_of_a_pt2_program_matches_pytorch_at_any_batch(files, cli, tmp_path):
    paths, model = files
    out = tmp_path / "guard.onnx"
    result = cli("export", "--model", paths["pt2"], "--reference", paths["data"], "--threshold", "1e6", "--out", out)
    assert result.code == 0, result.err
    x = torch.rand(5, 3, SIDE, SIDE)
    served = GuardSession(out).run(x.numpy())
    np.testing.assert_allclose(served.logits, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("subprocess", [False, True])
def test_export_refuses_a_torchscript_model(files, cli, expect_error, tmp_path, subprocess):
    paths, _ = files
    result = cli("export", "--model", paths["torchscript"], "--reference", paths["data"], "--threshold", "1",
                 "--out", tmp_path / "g.onnx", subprocess=subprocess)
    expect_error(result, 1, "scripted.pt", "TorchScript", "--arch")
    assert not (tmp_path / "g.onnx").exists()


@pytest.mark.parametrize("kind,subprocess", [("torchscript", True), ("pt2", False)])
def test_cleanse_refuses_a_compiled_model(files, cli, expect_error, tmp_path, kind, subprocess):
    paths, _ = files
    out = tmp_path / "clean.safetensors"
    result = cli("cleanse", "--model", paths[kind], "--arch", "small_cnn", "--data", "digits", "--out", out,
                 "--epochs", "1", subprocess=subprocess)
    expect_error(result, 1, "state dict", "--arch", "TorchScript")
    assert not out.exists()
    with pytest.raises(CleanseError, match="state dict"):
        BCU(epochs=1).cleanse(load_model(paths[kind]), torch.rand(100, 3, SIDE, SIDE))


# ------------------------------------------------------------------------------------------ broken files
BROKEN = [  # (file, words of the error line)
    ("truncated.safetensors", ["truncated", "safetensors"]),
    ("empty.safetensors", ["empty file"]),
    ("fake.safetensors", ["corrupt", "safetensors"]),
    ("notzip.pt2", ["zip archive", "torch.export"]),
    ("truncated.pt2", ["corrupt"]),
    ("truncated.pt", ["truncated"]),
    ("image.png", ["PNG image"]),
    ("guard.onnx", ["ONNX graph", "GuardSession", "--triton-repo"]),
]


@pytest.mark.parametrize("name,words", BROKEN, ids=[name for name, _ in BROKEN])
def test_broken_or_foreign_model_file_is_one_line(files, cli, expect_error, tmp_path, name, words):
    paths, _ = files
    result = cli("screen", "--model", paths[name], "--arch", "small_cnn", "--data", paths["data"],
                 "--out", tmp_path / "o", "--threshold", "1", subprocess=name == "truncated.pt2")
    line = expect_error(result, 1, name, "expected", *words)
    assert "pickle" not in line
    assert not (tmp_path / "o" / "results.csv").exists()
    with pytest.raises(ModelLoadError, match=name):
        load_model(paths[name], "small_cnn")


@settings(max_examples=30, deadline=None)
@given(fraction=st.floats(0.0, 0.999), which=st.sampled_from(["safetensors", "pt", "pt2", "torchscript"]))
def test_any_truncation_of_a_model_file_is_a_model_load_error(files, tmp_path_factory, fraction, which):
    content = files[0][which].read_bytes()
    path = tmp_path_factory.mktemp("cut") / files[0][which].name
    path.write_bytes(content[: int(len(content) * fraction)])
    with pytest.raises(ModelLoadError, match="expected"):
        load_model(path, "small_cnn")


# ------------------------------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize("name,subprocess", [("nan", True), ("inf.pt", False)])
def test_non_finite_weights_are_refused_at_load(files, cli, expect_error, tmp_path, name, subprocess):
    paths, _ = files
    result = cli("screen", "--model", paths[name], "--arch", "small_cnn", "--data", paths["data"],
                 "--out", tmp_path / "o", "--threshold", "1", subprocess=subprocess)
    expect_error(result, 1, paths[name].name, "features.1.0.weight", "NaN or infinite")
    with pytest.raises(ModelLoadError, match=r"features\.1\.0\.weight"):
        load_model(paths[name], "small_cnn")


def test_screen_api_refuses_a_model_with_nan_weights(files, tmp_path):
    """The Python API checks an in-memory model too (no file to load): no results are written."""
    from trojanguard.screening import screen

    paths, model = files
    broken = build_model("small_cnn", num_classes=10, in_channels=3)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.features[1][0].weight[0, 0, 0, 0] = math.nan
    with pytest.raises(ModelLoadError, match=r"model: .*features\.1\.0\.weight"):
        screen(broken, paths["data"], out_dir=tmp_path / "o", threshold=1.0)
    assert not (tmp_path / "o").exists()


class OverflowsOnWhiteCorner(nn.Module):
    """Infinite logits when the top-left pixel is 1 (a valid input): a model that overflows on some inputs."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x) / (1 - x[:, 0, 0, 0])[:, None]


def test_guard_flags_rows_with_non_finite_logits_in_pytorch_and_onnx(files, tmp_path):
    model = OverflowsOnWhiteCorner(files[1]).eval()
    reference = torch.rand(40, 3, SIDE, SIDE) * 0.9
    guard = Guard(model, FeatureMahalanobis(model, show_progress=False).fit(reference), threshold=1e9).eval()
    x = torch.rand(4, 3, SIDE, SIDE) * 0.9
    x[1, 0, 0, 0] = 1.0
    expected = [False, True, False, False]
    assert guard.run(x).flagged.tolist() == expected
    served = GuardSession(export_onnx(guard, tmp_path / "g.onnx", x[:2])).run(x.numpy())
    assert served.flagged.tolist() == expected and not np.isfinite(served.logits[1]).all()


def test_cleanse_with_a_diverging_learning_rate_saves_nothing(files, cli, expect_error, tmp_path):
    paths, _ = files
    data = tmp_path / "unlabeled.npz"
    np.savez(data, x=(np.random.default_rng(1).random((128, SIDE, SIDE, 3)) * 255).astype(np.uint8))
    out = tmp_path / "clean.safetensors"
    result = cli("cleanse", "--model", paths["safetensors"], "--arch", "small_cnn", "--data", data, "--out", out,
                 "--lr", "1e6", "--epochs", "3")
    expect_error(result, 1, "lr", "diverged")
    assert not out.exists() and not out.with_name("clean.report.json").exists()


def test_distillation_refuses_non_finite_batch_norm_statistics():
    """Parameters can stay finite while a running statistic overflows: the finished model is checked whole."""
    torch.manual_seed(0)
    teacher = build_model("small_cnn", num_classes=10, in_channels=3).eval()
    student = build_model("small_cnn", num_classes=10, in_channels=3)
    student.features[0][1].running_var.fill_(math.inf)
    data = UnlabeledImages(torch.rand(100, 3, 16, 16), batch_size=50, seed=0)
    with pytest.raises(CleanseError, match=r"features\.0\.1\.running_var.*lr 0\.01"):
        distill(student, teacher, data, DistillSettings(epochs=1), device=torch.device("cpu"), seed=0,
                show_progress=False)


# ------------------------------------------------------------------------------------------ model kinds (issue 14)
def _message(caught) -> str:
    message = str(caught.value)
    assert "\n" not in message, message
    return message


class _Tokens(nn.Module):
    """An open_clip-style model whose towers give what ``image`` / ``text`` say."""

    def __init__(self, image=lambda x: x.flatten(1)[:, :6], text=lambda t: t.float()[:, :6]):
        super().__init__()
        self.image, self.text, self.scale = image, text, nn.Parameter(torch.zeros(()))

    def encode_image(self, x):
        return self.image(x)

    def encode_text(self, tokens):
        return self.text(tokens)


def test_classifier_check_names_data_that_does_not_fit():
    model = build_model("small_cnn", num_classes=10, in_channels=3)
    with pytest.raises(DataError) as caught:
        as_classifier(model).check(torch.rand(2, 1, SIDE, SIDE))
    assert _message(caught).startswith("data: the model cannot run on images of shape (1, 32, 32) (C, H, W) from "
                                       "the data — its first convolution expects 3 input channels; the model said: "
                                       "RuntimeError: ")


@pytest.mark.parametrize("model, got", [
    (nn.Conv2d(3, 4, 1), "(2, 4, 32, 32)"),
    (nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 1)), "(2, 1)"),
    (nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 1), nn.Flatten(0)), "(2,)"),
])
def test_classifier_check_names_an_output_that_is_not_logits(model, got):
    with pytest.raises(DataError) as caught:
        Classifier(model).check(torch.rand(2, 3, SIDE, SIDE))
    assert _message(caught) == ("model output: expected logits of shape (N, num_classes ≥ 2) for images of shape "
                                f"(3, 32, 32), got {got}")


def test_classifier_check_refuses_non_finite_logits_with_the_callers_error():
    broken = build_model("small_cnn", num_classes=10, in_channels=3).eval()
    with torch.no_grad():
        broken.head.bias[0] = math.nan
    x = torch.rand(2, 3, SIDE, SIDE)
    expected = ("model: it returns NaN or infinite logits on the data; check its weights and the data's range "
                "([0, 1] pixels)")
    with pytest.raises(DataError) as caught:
        as_classifier(broken).check(x)
    assert _message(caught) == expected
    with pytest.raises(CleanseError) as caught:  # how cleansing asks for its own error
        as_classifier(broken).check(x, non_finite=CleanseError)
    assert _message(caught) == expected


def test_logits_check_at_every_call_site_names_what_came():
    """FeatureTap (feature detectors, Guard) and screening's predicted labels check their batches as a Classifier."""
    from trojanguard.screening.detectors import BatchScorer

    maps = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    x = torch.rand(2, 3, SIDE, SIDE)
    with pytest.raises(DataError) as caught:
        Classifier.logits(maps(x))
    assert _message(caught) == "model: expected (N, K) logits, got (2, 4, 32, 32)"
    with pytest.raises(DataError) as caught:
        FeatureMahalanobis(maps, layer="0", show_progress=False).fit(x)
    assert _message(caught) == "model: expected (N, K) logits, got (2, 4, 32, 32)"
    with pytest.raises(DataError) as caught:
        BatchScorer(Brightness(), maps).predict(x)
    assert _message(caught) == "model: expected (N, K) logits, got (2, 4, 32, 32)"


class Brightness:
    """The least detector: mean pixel value."""

    def score(self, x):
        return x.mean(dim=(1, 2, 3))


def test_screen_cli_names_a_model_whose_output_is_not_logits(files, cli, expect_error, tmp_path):
    paths, _ = files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1))).save(str(tmp_path / "maps.pt"))
    result = cli("screen", "--model", tmp_path / "maps.pt", "--data", paths["data"], "--threshold", "1",
                 "--no-report", "--steps", "2", "--out", tmp_path / "out")
    expect_error(result, 1, "model: expected (N, K) logits, got (1, 4, 32, 32)")


def test_a_kind_where_another_is_needed_is_one_line():
    classifier = as_classifier(build_model("small_cnn", num_classes=10, in_channels=3))
    with pytest.raises(DataError) as caught:
        as_encoder(classifier)
    assert _message(caught) == ("model: expected an Encoder (features (N, D)), got a Classifier, whose output is "
                                "(N, K) logits; pass layer=<name> to take features from one of its layers")
    with pytest.raises(DataError) as caught:
        as_classifier(as_encoder(classifier, layer="features.2"))
    assert _message(caught) == ("model: expected a Classifier ((N, C, H, W) images -> (N, K) logits), got an "
                                "Encoder, whose output is features; pass the classifier itself")
    with pytest.raises(DataError) as caught:
        Guard(as_image_text(_Tokens()), FeatureMahalanobis(classifier.module))
    assert _message(caught).startswith("model: expected a Classifier (")
    with pytest.raises(DataError) as caught:
        as_image_text(classifier.module)
    assert _message(caught) == ("model: expected an ImageText model (encode_image / encode_text, as open_clip's, or "
                                "get_image_features / get_text_features, as Hugging Face's CLIPModel), got SmallCNN, "
                                "which has neither pair")


@pytest.mark.parametrize("make", [as_classifier, as_encoder, as_image_text, lambda m: Guard(m, None)])
def test_a_model_that_is_not_a_module_is_a_type_error(make):
    with pytest.raises(TypeError) as caught:
        make("model.pt")
    assert _message(caught) == "model: expected a torch.nn.Module, got str"


def test_encoder_layer_that_does_not_exist_names_the_layers_there_are():
    with pytest.raises(ValueError) as caught:
        as_encoder(build_model("small_cnn", num_classes=10, in_channels=3), layer="layer4")
    assert _message(caught).startswith("layer: the model has no module named 'layer4'; some of its modules: features, ")


class _Lambda(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


@pytest.mark.parametrize("module, layer, got", [
    (_Lambda(lambda x: (x, x)), None, "a module whose output is tuple; pass layer=<name>"),
    (_Lambda(lambda x: x.sum(dim=(1, 2, 3))), None, "a module whose output is (2,); pass layer=<name>"),
    (_Lambda(lambda x: x[:, :, None]), None, "a module whose output is (2, 3, 1, 32, 32); pass layer=<name>"),
    (nn.Sequential(nn.Unflatten(1, (1, 3)), nn.Flatten()), "0",
     "layer '0' whose output is (2, 1, 3, 32, 32); pass another layer=<name>"),
], ids=["tuple", "1-D", "5-D", "5-D layer"])
def test_encoder_check_names_an_output_that_is_not_features(module, layer, got):
    with pytest.raises(DataError) as caught:
        Encoder(module, layer).check(torch.rand(2, 3, SIDE, SIDE), needed_by="PoisonCAM")
    assert _message(caught) == (f"model: PoisonCAM needs an Encoder (features (N, D) for 2 images): got {got} to take "
                                "features from one of its layers")


def test_encoder_check_refuses_non_finite_features():
    with pytest.raises(DataError) as caught:
        as_encoder(nn.Flatten()).check(torch.full((2, 3, 4, 4), math.inf))
    assert _message(caught) == ("model: its features are NaN or infinite on the data; check its weights and the "
                                "data's range ([0, 1] pixels)")


def test_image_text_check_names_each_side():
    x, tokens = torch.rand(2, 3, SIDE, SIDE), torch.ones(3, 8, dtype=torch.long)
    with pytest.raises(DataError) as caught:  # an output object with no features field it knows
        as_image_text(_Tokens(image=lambda x: {"hidden": x})).check(x)
    assert _message(caught) == ("model: expected an ImageText model: encode_image of 2 inputs returned dict; "
                                "expected features (N, D)")
    with pytest.raises(DataError) as caught:
        as_image_text(_Tokens(text=lambda t: t.float()[:, None])).check(x, tokens, needed_by="zero-shot screening")
    assert _message(caught) == ("model: zero-shot screening needs an ImageText model: encode_text of 3 inputs returned "
                                "(3, 1, 8); expected features (N, D)")
    with pytest.raises(DataError) as caught:
        as_image_text(_Tokens(text=lambda t: t.float())).check(x, tokens)
    assert _message(caught) == ("model: image and text features differ in size (6 and 8); expected one embedding "
                                "space")
    with pytest.raises(DataError) as caught:
        as_image_text(_Tokens(image=lambda x: x.flatten(1)[:, :6] / 0)).check(x)
    assert _message(caught) == ("model: encode_image returns NaN or infinite features; check its weights and inputs")
    with pytest.raises(ValueError, match="attention_mask: open_clip-style models take token ids only; expected None"):
        as_image_text(_Tokens()).encode_text(tokens, attention_mask=torch.ones_like(tokens))
