"""Evaluation metrics (METHODS.md §6): CA, ASR, RA, AUROC, AUPRC, TPR@FPR, precision/recall/F1, DER."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


@torch.no_grad()
def predict_labels(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Arg-max predictions ``(N,)`` of ``model`` on ``x: (N, C, H, W)``, in eval mode, batched."""
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    out = torch.cat([model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """CA: fraction of clean inputs classified as their true label."""
    return float((predict_labels(model, x) == y).float().mean())


def attack_success_rate(model: nn.Module, x_triggered: torch.Tensor, y_true: torch.Tensor, target: int) -> float:
    """ASR: fraction of triggered inputs whose true label is not the target that are classified as target."""
    keep = y_true != target
    if not keep.any():
        raise ValueError("attack_success_rate: every input already has the target label")
    return float((predict_labels(model, x_triggered[keep]) == target).float().mean())


def robust_accuracy(model: nn.Module, x_triggered: torch.Tensor, y_true: torch.Tensor, target: int) -> float:
    """RA: fraction of triggered non-target inputs still classified as their true label."""
    keep = y_true != target
    return float((predict_labels(model, x_triggered[keep]) == y_true[keep]).float().mean())


def _check_binary(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y, s = _np(labels).astype(bool).ravel(), _np(scores).astype(np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores: expected the same length, got {y.shape[0]} and {s.shape[0]}")
    if y.all() or not y.any():
        raise ValueError("labels: need both positive (poisoned) and negative (clean) examples")
    return y, s


def auroc(labels, scores) -> float:
    """Area under the ROC curve; labels True = poisoned, higher score = more suspicious."""
    from sklearn.metrics import roc_auc_score

    y, s = _check_binary(labels, scores)
    return float(roc_auc_score(y, s))


def auprc(labels, scores) -> float:
    """Area under the precision-recall curve (average precision)."""
    from sklearn.metrics import average_precision_score

    y, s = _check_binary(labels, scores)
    return float(average_precision_score(y, s))


def tpr_at_fpr(labels, scores, fpr: float) -> float:
    """Highest TPR whose threshold keeps the false-positive rate at most ``fpr`` (threshold from clean scores)."""
    y, s = _check_binary(labels, scores)
    clean = np.sort(s[~y])
    # flag scores strictly above the threshold; at most floor(fpr · n_clean) clean ones may pass
    k = int(np.floor(fpr * len(clean)))
    threshold = clean[len(clean) - k - 1] if k < len(clean) else -np.inf
    return float((s[y] > threshold).mean())


def precision_recall_f1(labels, flagged) -> tuple[float, float, float]:
    """Precision, recall and F1 of a flagged set (boolean) against the truth; 0 where undefined."""
    y, f = _np(labels).astype(bool).ravel(), _np(flagged).astype(bool).ravel()
    tp = float((y & f).sum())
    precision = tp / f.sum() if f.sum() else 0.0
    recall = tp / y.sum() if y.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def defense_effectiveness_rating(asr_before: float, asr_after: float, ca_before: float, ca_after: float) -> float:
    """DER = [max(0, ΔASR) − max(0, ΔCA) + 1] / 2 with Δ = before − after (drops are positive)."""
    return (max(0.0, asr_before - asr_after) - max(0.0, ca_before - ca_after) + 1) / 2
