"""Encoder metrics: linear-probe CA / ASR and cosine k-NN on a toy case whose answers are known, and bad input."""

import pytest
import torch
from torch import nn

from trojanguard.errors import DataError
from trojanguard.metrics import (
    LinearProbe,
    knn_accuracy,
    knn_attack_success_rate,
    linear_probe,
    probe_attack_success_rate,
)


def toy(n: int, seed: int):
    """Images (n, 1, 2, 2): class c ∈ {0..3} lights pixel c at 1, the rest noise below 0.2; separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.rand(n, 1, 2, 2, generator=g) * 0.2
    x.view(n, 4)[torch.arange(n), y] = 1.0
    return x, y


ENCODER = nn.Flatten()  # features = the 4 pixels


def test_probe_and_knn_on_a_separable_toy_case():
    train_x, train_y = toy(80, 0)
    test_x, test_y = toy(40, 1)
    assert linear_probe(ENCODER, train_x, train_y, test_x, test_y) == 1.0
    assert knn_accuracy(ENCODER, train_x, train_y, test_x, test_y, k=5) == 1.0
    triggered = test_x.clone()
    triggered.view(40, 4)[:, 0] = 1.0
    triggered.view(40, 4)[torch.arange(40), test_y] = 0.1  # the trigger: pixel 0 on, own pixel off
    assert probe_attack_success_rate(ENCODER, train_x, train_y, triggered, test_y, target=0) == 1.0
    assert LinearProbe(ENCODER, train_x, train_y).attack_success_rate(test_x, test_y, target=0) == 0.0
    assert knn_attack_success_rate(ENCODER, train_x, train_y, triggered, test_y, target=0, k=5) == 1.0
    assert knn_attack_success_rate(ENCODER, train_x, train_y, test_x, test_y, target=0, k=5) == 0.0


class NaNEncoder(nn.Module):
    def forward(self, x):
        return torch.full((len(x), 3), float("nan"))


class ScalarEncoder(nn.Module):
    def forward(self, x):
        return x.flatten(1).sum(1)  # (N,): not features


def test_bad_input_is_refused_with_the_argument_named():
    x, y = toy(40, 0)
    with pytest.raises(DataError, match="NaN or infinite"):
        linear_probe(NaNEncoder(), x, y, x, y)
    with pytest.raises(DataError, match=r"train_y: expected labels of shape \(40,\)"):
        linear_probe(ENCODER, x, y[:-1], x, y)
    with pytest.raises(DataError, match=r"test_y: expected labels of shape \(40,\)"):
        knn_accuracy(ENCODER, x, y, x, y[:5], k=3)
    with pytest.raises(DataError, match=r"\(N, D\)"):
        linear_probe(ScalarEncoder(), x, y, x, y)
    with pytest.raises(DataError, match="train_x"):
        linear_probe(ENCODER, x[:, 0], y, x, y)  # (N, 2, 2): not images
    with pytest.raises(DataError, match=r"k: expected an integer in \[1, 40\]"):
        knn_accuracy(ENCODER, x, y, x, y, k=41)
    with pytest.raises(DataError, match="at least 2 classes"):
        linear_probe(ENCODER, x, torch.zeros(40, dtype=torch.long), x, y)
    with pytest.raises(DataError, match="target label"):
        probe_attack_success_rate(ENCODER, x, y, x, torch.zeros(40, dtype=torch.long), target=0)
    with pytest.raises(DataError, match="target label"):
        knn_attack_success_rate(ENCODER, x, y, x, torch.zeros(40, dtype=torch.long), target=0, k=3)
