"""Evaluations of the three model kinds on cases whose answer is known: a linear probe on an encoder's features
(separable features → CA 1.0; features that ignore the class → chance) and zero-shot classification of an
image–text model (one-hot embeddings → CA 1.0, a trigger that turns every image into the target → ASR 1.0)."""

import math

import pytest
import torch
from torch import nn

from trojanguard.cleanse import Evaluation, LinearProbeEvaluation, ZeroShotEvaluation
from trojanguard.cleanse.evaluation import zero_shot_logits
from trojanguard.errors import DataError

CLASSES = 4


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1×4×4 images in [0, 1]: noise below 0.3, and class c lights pixel (0, c) of the first row."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.rand(n, 1, 4, 4, generator=g) * 0.3
    x[torch.arange(n), 0, 0, y] = 1.0
    return x, y


def _to_target(x: torch.Tensor) -> torch.Tensor:
    """The trigger: the first row becomes that of class 0."""
    out = x.clone()
    out[:, 0, 0, :] = 0.0
    out[:, 0, 0, 0] = 1.0
    return out


def test_linear_probe_on_separable_features_is_exact_and_reads_the_trigger():
    probe_x, probe_y = _images(80, seed=0)
    x, y = _images(80, seed=1)
    identity = nn.Flatten()
    evaluation = LinearProbeEvaluation(probe_x, probe_y, x, y, trigger=_to_target, target=0)
    assert evaluation(identity) == {"clean_accuracy": 1.0, "attack_success_rate": 1.0}


def test_linear_probe_on_features_that_ignore_the_class_is_near_chance():
    probe_x, probe_y = _images(200, seed=0)
    x, y = _images(200, seed=1)

    def noise_rows(images):  # rows 1–3: the noise only, never the class pixel
        return images[:, :, 1:, :].flatten(1)

    ca = LinearProbeEvaluation(probe_x, probe_y, x, y)(noise_rows)["clean_accuracy"]
    assert abs(ca - 1 / CLASSES) < 0.12  # chance 0.25; 200 images: one standard deviation ≈ 0.03


def test_linear_probe_measures_a_module_in_eval_mode_and_restores_its_mode():
    probe_x, probe_y = _images(40, seed=0)
    encoder = nn.Sequential(nn.Flatten(), nn.Dropout(0.99))  # in train mode, dropout would erase the features
    encoder.train()
    assert LinearProbeEvaluation(probe_x, probe_y, *_images(40, seed=1))(encoder)["clean_accuracy"] == 1.0
    assert encoder.training and encoder[1].training


class ToyImageText(nn.Module):
    """Image embedding: the first row (the class pixels); text embedding of class prompt [c]: the one-hot of c."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(tokens[:, 0], CLASSES).float()


def test_zero_shot_on_one_hot_embeddings_is_exact_and_reads_the_trigger():
    x, y = _images(40, seed=2)
    tokens = torch.arange(CLASSES)[:, None]  # one "prompt" of one token per class
    model = ToyImageText().train()
    evaluation = ZeroShotEvaluation(x, y, tokens, trigger=_to_target, target=0)
    assert evaluation(model) == {"clean_accuracy": 1.0, "attack_success_rate": 1.0}
    assert model.training
    image = model.encode_image(x).detach()
    logits = zero_shot_logits(model, image, model.encode_text(tokens))  # CLIP: logit_scale holds log(scale)
    cosine = image / image.norm(dim=1, keepdim=True)  # the text embeddings are unit one-hots already
    assert torch.allclose(logits, 100.0 * cosine, atol=1e-4)


def test_zero_shot_with_prompts_in_the_wrong_order_scores_zero():
    x, y = _images(40, seed=2)
    shifted = ((torch.arange(CLASSES) + 1) % CLASSES)[:, None]
    assert ZeroShotEvaluation(x, y, shifted)(ToyImageText())["clean_accuracy"] == 0.0


def test_evaluations_refuse_what_they_cannot_measure():
    x, y = _images(8, seed=0)
    with pytest.raises(TypeError, match="encode_text"):
        ZeroShotEvaluation(x, y, torch.arange(CLASSES)[:, None])(nn.Flatten())
    with pytest.raises(DataError, match=r"labels of the 2 class prompts"):
        ZeroShotEvaluation(x, y, torch.arange(2)[:, None])(ToyImageText())
    with pytest.raises(DataError, match=r"encoder output: expected one feature vector per input"):
        LinearProbeEvaluation(x, y, x, y)(lambda images: images)  # (N, 1, 4, 4), not features
    with pytest.raises(DataError, match="at least 2 classes"):
        LinearProbeEvaluation(x, torch.zeros(8, dtype=torch.long), x, y)
    with pytest.raises(DataError, match=r"LinearProbeEvaluation\.target"):
        LinearProbeEvaluation(x, y, x, y, trigger=_to_target)
    with pytest.raises(DataError, match=r"Evaluation\.y"):
        Evaluation(x, y[:3])
