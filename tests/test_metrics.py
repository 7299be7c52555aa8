import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from trojanguard import metrics
from trojanguard.models import SmallCNN


def test_auroc_auprc_match_sklearn_and_hand_cases():
    assert metrics.auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert metrics.auroc([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == 0.75  # 3 of 4 pairs ordered
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 200), rng.normal(size=200)
    assert metrics.auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert metrics.auprc(y, torch.tensor(s)) == pytest.approx(average_precision_score(y, s))
    with pytest.raises(ValueError, match="both positive"):
        metrics.auroc([1, 1], [0.1, 0.2])


def test_tpr_at_fpr():
    clean = np.arange(100) / 100  # 0.00 .. 0.99
    poison = np.array([0.995, 0.985, 0.975, 0.5])
    labels = np.r_[np.zeros(100), np.ones(4)]
    scores = np.r_[clean, poison]
    # 1 % FPR: threshold 0.98 (one clean score above) -> 0.995 and 0.985 flagged
    assert metrics.tpr_at_fpr(labels, scores, 0.01) == 0.5
    assert metrics.tpr_at_fpr(labels, scores, 0.0) == 0.25
    assert metrics.tpr_at_fpr(labels, scores, 1.0) == 1.0


def test_precision_recall_f1_match_sklearn():
    y = np.array([1, 1, 0, 0, 1, 0])
    f = np.array([1, 0, 1, 0, 1, 0])
    p, r, f1 = metrics.precision_recall_f1(y, f)
    assert (p, r, f1) == pytest.approx((precision_score(y, f), recall_score(y, f), f1_score(y, f)))
    assert metrics.precision_recall_f1(y, np.zeros(6)) == (0.0, 0.0, 0.0)


def test_der_subtracts_clean_accuracy_loss():
    assert metrics.defense_effectiveness_rating(1.0, 0.0, 0.9, 0.9) == 1.0
    assert metrics.defense_effectiveness_rating(1.0, 0.0, 0.9, 0.7) == pytest.approx(0.9)
    assert metrics.defense_effectiveness_rating(0.5, 0.9, 0.8, 0.9) == 0.5  # no credit for gains


class _Fixed(torch.nn.Module):
    """Predicts class = round(mean pixel * 9)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        k = (x.mean(dim=(1, 2, 3)) * 9).round().long()
        return torch.nn.functional.one_hot(k, 10).float()


def test_ca_asr_ra_on_a_known_model():
    model = _Fixed()
    levels = torch.tensor([0, 1, 2, 3]) / 9
    x = levels.view(4, 1, 1, 1).expand(4, 3, 4, 4).contiguous()
    y = torch.tensor([0, 1, 2, 0])
    assert metrics.clean_accuracy(model, x, y) == 0.75
    triggered = torch.zeros_like(x)  # everything predicted as 0
    assert metrics.attack_success_rate(model, triggered, y, target=0) == 1.0  # only the 2 non-target count
    assert metrics.robust_accuracy(model, triggered, y, target=0) == 0.0
    assert metrics.predict_labels(SmallCNN(), torch.rand(5, 3, 16, 16)).shape == (5,)
