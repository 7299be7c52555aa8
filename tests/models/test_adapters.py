"""The three model kinds (issue 14): each wraps what the user brings as it is, gives the underlying model's own
outputs, comes back unchanged from its own ``as_*``, moves and traces like the module inside, and keeps the
user's module reachable as ``.module``. Errors are in tests/bad_input/test_models_input.py."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from trojanguard.errors import DataError
from trojanguard.models import (
    Classifier,
    Encoder,
    ImageText,
    SmallCNN,
    as_classifier,
    as_encoder,
    as_image_text,
    unwrap,
)

torch.manual_seed(0)
X = torch.rand(4, 3, 32, 32)


def _plain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5)).eval()


# ------------------------------------------------------------------------------------------------ Classifier
def test_classifier_of_a_plain_module_gives_its_logits_and_class_count():
    model = _plain()
    clf = as_classifier(model)
    assert isinstance(clf, Classifier) and clf.module is model and unwrap(clf) is model
    assert torch.equal(clf(X), model(X))
    assert clf.check(X[:2]) == 5
    assert as_classifier(clf) is clf  # already of the kind: unchanged


def test_classifier_of_a_torchvision_resnet():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    clf = as_classifier(model)
    assert torch.equal(clf(X), model(X)) and clf.check(X[:2]) == 10
    # the wrapper has no state of its own: its state dict is the model's, under "module."
    assert {k.removeprefix("module.") for k in clf.state_dict()} == set(model.state_dict())


def test_classifier_traces_copies_and_moves_like_the_module():
    model = _plain()
    clf = as_classifier(model)
    traced = torch.jit.trace(clf, X[:2])
    assert torch.allclose(traced(X), model(X), atol=1e-6)
    twin = copy.deepcopy(clf)
    assert twin.module is not model and torch.equal(twin(X), model(X))
    clf.to(torch.float64)
    assert model[0].weight.dtype == torch.float64  # the user's module moved with the wrapper


def test_classifier_check_accepts_a_single_logit_only_when_asked():
    binary = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1))
    assert Classifier(binary).check(X[:2], min_classes=1) == 1


def test_classifier_logits_passes_logits_through():
    logits = torch.randn(3, 7)
    assert Classifier.logits(logits) is logits


# ------------------------------------------------------------------------------------------------ Encoder
def test_encoder_from_a_classifier_layer_pools_the_map():
    model = SmallCNN().eval()
    enc = as_encoder(as_classifier(model), layer="features.2")
    assert isinstance(enc, Encoder) and enc.module is model and unwrap(enc) is model  # names are the user's
    captured = {}
    handle = model.features[2].register_forward_hook(lambda m, i, o: captured.update(map=o))
    model(X)
    handle.remove()
    assert torch.allclose(enc(X), captured["map"].mean(dim=(2, 3)), atol=1e-6)
    assert enc.check(X[:2]) == captured["map"].shape[1]
    assert as_encoder(enc) is enc


def test_encoder_of_a_feature_module_is_its_output():
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    enc = as_encoder(backbone)
    assert torch.equal(enc(X), backbone(X)) and enc.check(X[:2]) == 6


def test_encoder_means_token_outputs():
    class Tokens(nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)  # (N, H·W, C): one token per pixel

    enc = as_encoder(Tokens())
    assert torch.allclose(enc(X), X.mean(dim=(2, 3)), atol=1e-6)


def test_encoder_of_a_torchvision_resnet_layer():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    enc = as_encoder(model, layer="layer4")
    assert enc(X).shape == (4, 512) and enc.check(X[:2]) == 512
    traced = torch.jit.trace(enc, X[:2])
    assert torch.allclose(traced(X), enc(X), atol=1e-5)


# ------------------------------------------------------------------------------------------------ ImageText
class _Towers(nn.Module):
    """An image tower, a token embedding and ``logit_scale`` kept as a log (as open_clip and CLIPModel do)."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, dim, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.token_embedding = nn.Embedding(20, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


class FakeOpenClip(_Towers):
    """open_clip's surface: encode_image / encode_text."""

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, text):
        return self.token_embedding(text).mean(1)


@dataclass
class PooledOutput:
    """transformers 5's BaseModelOutputWithPooling, in the fields that matter here."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor


class FakeHFClip(_Towers):
    """Hugging Face CLIPModel's surface: get_image_features / get_text_features by keyword; ``v5`` returns an
    output object whose pooler_output holds the projected features (last_hidden_state: other tokens), as
    transformers 5 does; otherwise the tensor, as transformers 4 does."""

    def __init__(self, v5: bool):
        super().__init__()
        self.v5 = v5

    def get_image_features(self, pixel_values):
        features = self.visual(pixel_values)
        return PooledOutput(torch.zeros(len(features), 9, 4), features) if self.v5 else features

    def get_text_features(self, input_ids, attention_mask=None):
        embedded = self.token_embedding(input_ids)
        weights = torch.ones(input_ids.shape, dtype=embedded.dtype) if attention_mask is None else attention_mask.float()
        features = (embedded * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        return PooledOutput(torch.zeros(len(features), 9, 4), features) if self.v5 else features


TOKENS = torch.randint(0, 20, (3, 5))


def test_image_text_of_an_open_clip_style_model():
    model = FakeOpenClip()
    it = as_image_text(model)
    assert isinstance(it, ImageText) and it.style == "open_clip" and it.module is model and unwrap(it) is model
    assert torch.equal(it.encode_image(X), model.encode_image(X))
    assert torch.equal(it.encode_text(TOKENS), model.encode_text(TOKENS))
    assert torch.equal(it(X), model.encode_image(X))  # forward: the image side
    assert it.logit_scale.item() == pytest.approx(1 / 0.07)  # the multiplier, not the stored log
    assert it.check(X[:2], TOKENS) == 6
    assert as_image_text(it) is it
    enc = as_encoder(it)  # an image encoder from it
    assert torch.equal(enc(X), model.encode_image(X)) and enc.check(X[:2]) == 6


@pytest.mark.parametrize("v5", [False, True], ids=["transformers4-tensor", "transformers5-output"])
def test_image_text_of_a_hugging_face_style_model_unwraps_both_versions(v5):
    model = FakeHFClip(v5=v5)
    it = as_image_text(model)
    assert it.style == "hf"
    expected_image = model.visual(X)
    assert torch.equal(it.encode_image(X), expected_image)
    mask = torch.ones_like(TOKENS)
    mask[:, 3:] = 0
    raw = model.get_text_features(input_ids=TOKENS, attention_mask=mask)
    expected_text = raw.pooler_output if v5 else raw
    assert torch.equal(it.encode_text(TOKENS, attention_mask=mask), expected_text)
    assert not torch.equal(it.encode_text(TOKENS), expected_text)  # the mask reached the model
    assert it.check(X[:2], TOKENS) == 6


def test_image_text_of_a_model_without_logit_scale_has_none():
    model = FakeOpenClip()
    del model.logit_scale
    assert as_image_text(model).logit_scale is None


def test_image_text_of_a_real_tiny_transformers_clip():
    try:
        import transformers
        from transformers import CLIPConfig, CLIPModel
    except ImportError:
        print("skipped: transformers is not installed")
        pytest.skip("transformers is not installed")
    config = CLIPConfig(
        text_config={"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=12)
    model = CLIPModel(config).eval()
    it = as_image_text(model)
    tokens = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        image, text = it.encode_image(X), it.encode_text(tokens)
        full = model(input_ids=tokens, pixel_values=X)
    assert image.shape == (4, 12) and text.shape == (3, 12), transformers.__version__
    normalised = image / image.norm(dim=-1, keepdim=True)
    assert torch.allclose(normalised, full.image_embeds, atol=1e-5)
    assert torch.allclose(it.logit_scale, model.logit_scale.exp())
    assert it.check(X[:2], tokens) == 12


def test_feature_tap_of_a_classifier_wrapper_uses_the_users_layer_names():
    from trojanguard.models.features import FeatureTap

    model = SmallCNN().eval()
    tap = FeatureTap(as_classifier(model), "features.2")
    logits, feature = tap(X)
    assert torch.allclose(logits, model(X), atol=1e-6) and tap.num_classes == 10
    assert torch.allclose(feature, as_encoder(model, layer="features.2")(X), atol=1e-6)  # the same pooled feature


def test_each_method_states_the_kind_it_needs_and_refuses_another():
    """Detectors and BCU declare model_kind = Classifier, and an Encoder given instead is one DataError line."""
    from trojanguard.cleanse import BCU, Cleanser
    from trojanguard.detect import AmortizedCD, CognitiveDistillation, FeatureMahalanobis

    encoder = as_encoder(SmallCNN().eval(), layer="features.2")
    for method in (CognitiveDistillation, FeatureMahalanobis, AmortizedCD):
        assert method.model_kind is Classifier
        with pytest.raises(DataError, match=r"^model: expected a Classifier .* got an Encoder"):
            method(encoder)
        assert method(as_classifier(SmallCNN())).model is not None  # a Classifier is taken as it is
    assert BCU.model_kind is Classifier and Cleanser.model_kind is None
    with pytest.raises(DataError, match=r"^model: expected a Classifier"):
        BCU(epochs=1).cleanse(encoder, torch.rand(100, 3, 32, 32))
