"""Evaluation metrics (METHODS.md §6): CA, ASR, RA, AUROC, AUPRC, TPR@FPR, precision/recall/F1, DER; and an encoder's
CA / ASR through a linear probe or k-NN on its frozen features (self-supervised encoders have no head of their own)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trojanguard.errors import DataError


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


def success_mask(y_true: torch.Tensor, target: int, attack=None, metric: str = "attack_success_rate") -> torch.Tensor:
    """Which triggered inputs ASR counts, ``(N,)`` bool from true labels ``y_true: (N,)``: those whose true label is
    not ``target``, or, given the ``attack``, its own rule (``attack.success_mask``: a source-specific attack counts
    its source classes only). ValueError naming ``metric`` when none counts (the rate would be undefined)."""
    keep = y_true != target if attack is None else attack.success_mask(y_true, target)
    if not keep.any():
        raise ValueError(f"{metric}: every input already has the target label" if attack is None else
                         f"{metric}: no input counts for {type(attack).__name__}'s ASR (every true label is the "
                         "target or outside the classes it counts)")
    return keep


def attack_success_rate(model: nn.Module, x_triggered: torch.Tensor, y_true: torch.Tensor, target: int,
                        attack=None) -> float:
    """ASR: fraction of the triggered inputs that count (:func:`success_mask`: true label not the target; with the
    ``attack``, its own rule) that are classified as target."""
    keep = success_mask(y_true, target, attack)
    return float((predict_labels(model, x_triggered[keep]) == target).float().mean())


def robust_accuracy(model: nn.Module, x_triggered: torch.Tensor, y_true: torch.Tensor, target: int,
                    attack=None) -> float:
    """RA: fraction of the triggered inputs ASR counts (:func:`success_mask`) still classified as their true label."""
    keep = success_mask(y_true, target, attack, "robust_accuracy")
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


# --- encoders: a probe on frozen features -------------------------------------------------------------------------

PROBE_MAX_ITER = 1000  # logistic-regression iterations (lbfgs on standardised features converges well within)
DEFAULT_KNN_K = 20  # neighbours of the k-NN monitor (as in the SSL literature's k-NN evaluations: 20–200)


def _labels_for(y, n: int, name: str) -> np.ndarray:
    if not isinstance(y, torch.Tensor) or y.shape != (n,):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise DataError(f"{name}: expected labels of shape ({n},) (one per image), got {got}")
    return y.detach().cpu().long().numpy()


def encoder_features(encoder: nn.Module, x: torch.Tensor, *, name: str = "x",
                     batch_size: int = 256) -> np.ndarray:
    """The features ``(N, D)`` of ``encoder`` (any module with ``(N, D)`` output, or an Encoder) on images
    ``x: (N, C, H, W)`` in [0, 1], in eval mode and without gradients, as float64 numpy. Raises DataError naming
    ``name`` for bad images, output that is not ``(N, D)``, or NaN / infinite features."""
    from trojanguard.cleanse.evaluation import embed
    from trojanguard.data.core import check_images
    from trojanguard.models.adapters import as_encoder

    check_images(x, name)
    if len(x) == 0:
        raise DataError(f"{name}: expected at least one image, got none")
    encoder = as_encoder(encoder)
    features = embed(encoder, encoder, x, batch_size=batch_size, what=f"encoder output on {name}")
    if not torch.isfinite(features).all():
        raise DataError(f"encoder: its features on {name} are NaN or infinite; check its weights and the images' "
                        "range ([0, 1] pixels)")
    return features.double().numpy()


class LinearProbe:
    """A logistic regression on an encoder's frozen, standardised features, fitted on labelled clean images
    (scikit-learn). ``predict(x) -> (N,)`` classes of images ``(N, C, H, W)``."""

    def __init__(self, encoder: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, *,
                 max_iter: int = PROBE_MAX_ITER):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        features = encoder_features(encoder, train_x, name="train_x")
        labels = _labels_for(train_y, len(train_x), "train_y")
        if len(np.unique(labels)) < 2:
            raise DataError(f"train_y: expected labels of at least 2 classes, got {len(np.unique(labels))}")
        self.encoder = encoder
        self.probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter)).fit(features, labels)

    def predict(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        return torch.from_numpy(self.probe.predict(encoder_features(self.encoder, x, name=name))).long()

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """CA: fraction of ``x`` classified as its label ``y``."""
        labels = _labels_for(y, len(x), "test_y")
        return float((self.predict(x, "test_x").numpy() == labels).mean())

    def attack_success_rate(self, x_triggered: torch.Tensor, y_true: torch.Tensor, target: int) -> float:
        """ASR: fraction of triggered images whose true label is not ``target`` that the probe calls ``target``."""
        labels = _labels_for(y_true, len(x_triggered), "test_y")
        keep = labels != target
        if not keep.any():
            raise DataError(f"test_y: every image already has the target label {target}; ASR needs others")
        predicted = self.predict(x_triggered[torch.from_numpy(keep)], "triggered_x").numpy()
        return float((predicted == target).mean())


def linear_probe(encoder: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, *, max_iter: int = PROBE_MAX_ITER) -> float:
    """Clean accuracy of a linear probe (:class:`LinearProbe`) fitted on ``train_x``/``train_y`` and measured
    on ``test_x``/``test_y``: how linearly separable the encoder's frozen features keep the classes."""
    return LinearProbe(encoder, train_x, train_y, max_iter=max_iter).accuracy(test_x, test_y)


def probe_attack_success_rate(encoder: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                              triggered_x: torch.Tensor, test_y: torch.Tensor, target: int, *,
                              max_iter: int = PROBE_MAX_ITER) -> float:
    """ASR through a linear probe fitted on clean ``train_x``/``train_y``: the share of ``triggered_x`` (test
    images with the trigger, true labels ``test_y``) not of class ``target`` that the probe calls ``target``.
    A backdoored encoder moves triggered images toward the target's features, so a clean probe follows."""
    probe = LinearProbe(encoder, train_x, train_y, max_iter=max_iter)
    return probe.attack_success_rate(triggered_x, test_y, target)


def knn_predict(encoder: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, *,
                k: int = DEFAULT_KNN_K, name: str = "test_x") -> torch.Tensor:
    """Classes ``(N,)`` of images ``x`` by a cosine k-NN vote on frozen features: each image takes the majority
    label of its ``k`` most similar training images (ties to the smaller label)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(train_x):
        raise DataError(f"k: expected an integer in [1, {len(train_x)}] (the number of training images), got {k!r}")
    train_features = torch.from_numpy(encoder_features(encoder, train_x, name="train_x"))
    features = torch.from_numpy(encoder_features(encoder, x, name=name))
    labels = torch.from_numpy(_labels_for(train_y, len(train_x), "train_y"))
    if train_features.shape[1] != features.shape[1]:
        raise DataError(f"encoder: features of train_x and {name} differ in size ({train_features.shape[1]} and "
                        f"{features.shape[1]}); expected images of one shape")
    similarity = F.normalize(features, dim=1) @ F.normalize(train_features, dim=1).T
    neighbours = labels[similarity.topk(k, dim=1).indices]  # (N, k)
    return F.one_hot(neighbours, int(labels.max()) + 1).sum(1).argmax(1)


def knn_accuracy(encoder: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, *, k: int = DEFAULT_KNN_K) -> float:
    """Clean accuracy of a cosine k-NN classifier on frozen features (:func:`knn_predict`). No training, so it
    measures the feature space itself, as SSL papers' k-NN monitors do."""
    truth = torch.from_numpy(_labels_for(test_y, len(test_x), "test_y"))
    return float((knn_predict(encoder, train_x, train_y, test_x, k=k) == truth).float().mean())


def knn_attack_success_rate(encoder: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                            triggered_x: torch.Tensor, test_y: torch.Tensor, target: int, *,
                            k: int = DEFAULT_KNN_K) -> float:
    """ASR of the k-NN vote (:func:`knn_predict`, clean labelled ``train_x``): the share of triggered test images
    whose true label ``test_y`` is not ``target`` that the vote calls ``target``."""
    labels = torch.from_numpy(_labels_for(test_y, len(triggered_x), "test_y"))
    keep = labels != target
    if not keep.any():
        raise DataError(f"test_y: every image already has the target label {target}; ASR needs others")
    predicted = knn_predict(encoder, train_x, train_y, triggered_x[keep], k=k, name="triggered_x")
    return float((predicted == target).float().mean())
