"""Activation Clustering (Chen et al., 2018): within a class, poison and clean samples form two clusters of
activations.

Fit, on the screened (possibly poisoned) set itself: per class (the model's predicted class, or given labels),
reduce the pooled features of one layer to ``components`` dimensions (PCA by default, or ICA as in the paper; both
scikit-learn, both an affine map), then split them with 2-means. Chen et al. call a class poisoned when the split
is clean (high silhouette) or one cluster is small (relative size ≤ 0.35), and remove the smaller cluster.

Scores (``score=``), higher = more suspicious:

- ``"size"`` (default): Chen's two criteria as one number, ``(1 − relative size of the sample's cluster) ·
  max(silhouette of the class's split, 0)``. A sample in the small cluster of a well-split class scores high; in a
  class without two clusters (silhouette near 0) every sample scores near 0, so the arbitrary halves 2-means cuts
  a clean class into do not reach the top of the ranking. Constant within a cluster: a coarse ranking.
- ``"distance"``: distance to the centre of the class's larger cluster in the reduced space, in units of that
  cluster's root-mean-square spread. A continuous ranking, but in a clean class the smaller half of an arbitrary
  split also lies far from the larger one's centre.

Why PCA by default: it is deterministic and fast; ICA (``reduction="ica"``, the paper's) is iterative and its
components depend on the seed. Their measured difference on the zoo is in ``benchmarks/RESULTS.md``.

Scoring new inputs assigns them to the nearest of their predicted class's two centres, as 2-means does: pure
tensor operations in :class:`ClusteringScorer` (one forward pass, exportable to ONNX). A class with fewer than
``MIN_CLASS_SAMPLES`` fit samples is not split; inputs predicted as it score 0 (and the fit warns).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from trojanguard.detect._feature_detector import FeatureDetector, Features
from trojanguard.detect.base import SampleSizeWarning
from trojanguard.errors import DataError, check_choice, check_positive_int
from trojanguard.models.features import FeatureTap

REDUCTIONS = ("pca", "ica")
CLUSTER_SCORES = ("size", "distance")
DEFAULT_COMPONENTS = 10  # Chen et al. reduce to 10 dimensions
MIN_CLASS_SAMPLES = 6  # 2-means and a silhouette need a few samples per cluster
KMEANS_STARTS = 10
ICA_MAX_ITER = 400


class ActivationClustering(FeatureDetector):
    """Activation Clustering of a layer's pooled features, per class, fitted on the screened data itself.

    Args:
        model: any ``nn.Module`` classifier taking ``(N, C, H, W)`` in [0, 1] and returning ``(N, K)`` logits;
            never modified (the detector runs a private copy).
        layer: module whose output is the feature; default: the last 4-D output before global pooling.
        components: dimensions kept by the reduction (at most the class size − 1 and the feature size).
        reduction: ``"pca"`` (default) or ``"ica"`` (the paper's; module docstring).
        score: ``"size"`` (default) or ``"distance"`` (module docstring).
        batch_size: images per forward pass. seed: the reduction and 2-means. show_progress: progress bar.

    After :meth:`fit`: ``silhouettes`` (K,) and ``cluster_sizes`` (K, 2) of each class's split, ``class_counts``,
    ``fit_warnings``, ``input_shape``.
    """

    FIT_CALL = "fit(data)"
    SCORE_DESCRIPTION = "activation clustering"

    def __init__(self, model: nn.Module, *, layer: str | None = None, components: int = DEFAULT_COMPONENTS,
                 reduction: str = "pca", score: str = "size", batch_size: int = 256, seed: int = 0,
                 show_progress: bool = True):
        check_positive_int("components", components)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("score", score, CLUSTER_SCORES)
        super().__init__(model, layer=layer, batch_size=batch_size, show_progress=show_progress)
        self.components, self.reduction, self.score_rule, self.seed = components, reduction, score, seed
        self.fit_state: dict[str, torch.Tensor] | None = None
        self.silhouettes: torch.Tensor | None = None
        self.cluster_sizes: torch.Tensor | None = None
        self.class_counts: torch.Tensor | None = None
        self.fit_warnings: list[str] = []

    def __repr__(self) -> str:
        return (f"ActivationClustering(layer={self.layer!r}, components={self.components!r}, "
                f"reduction={self.reduction!r}, score={self.score_rule!r}, batch_size={self.batch_size!r}, "
                f"seed={self.seed!r})")

    @property
    def fitted(self) -> bool:
        return self.fit_state is not None

    def fit_features(self, features: Features, labels: torch.Tensor | None = None) -> ActivationClustering:
        """:meth:`fit` on features already extracted (shared with other detectors on the same layer)."""
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score

        self._check_layer(features)
        classes, num_classes = features.classes(labels), features.num_classes
        values = features.features.numpy()
        dim = values.shape[1]
        width = min(self.components, dim)
        offsets = np.zeros((num_classes, dim))
        projections = np.zeros((num_classes, width, dim))
        centres = np.zeros((num_classes, 2, width))
        cluster_scores = np.zeros((num_classes, 2))
        larger = np.zeros(num_classes, dtype=np.int64)
        spreads = np.ones(num_classes)
        silhouettes = np.zeros(num_classes)
        sizes = np.zeros((num_classes, 2), dtype=np.int64)
        counts = torch.bincount(classes, minlength=num_classes)
        if not (counts >= MIN_CLASS_SAMPLES).any():
            raise DataError(f"data: expected at least {MIN_CLASS_SAMPLES} images of one class to cluster, got class "
                            f"counts {counts.tolist()}")
        for k in torch.nonzero(counts >= MIN_CLASS_SAMPLES).flatten().tolist():
            members = values[(classes == k).numpy()]
            offset, projection = self._reduction(members, min(width, len(members) - 1))
            reduced = (members - offset) @ projection.T
            kmeans = KMeans(n_clusters=2, n_init=KMEANS_STARTS, random_state=self.seed).fit(reduced)
            assigned = kmeans.labels_
            sizes[k] = np.bincount(assigned, minlength=2)
            c = projection.shape[0]
            offsets[k], projections[k, :c], centres[k, :, :c] = offset, projection, kmeans.cluster_centers_
            if sizes[k].min() >= 2 and np.ptp(reduced, axis=0).max() > 0:
                silhouettes[k] = silhouette_score(reduced, assigned)
            cluster_scores[k] = (1 - sizes[k] / sizes[k].sum()) * max(silhouettes[k], 0.0)
            larger[k] = int(np.argmax(sizes[k]))
            inside = reduced[assigned == larger[k]] - kmeans.cluster_centers_[larger[k]]
            spreads[k] = max(float(np.sqrt((inside * inside).sum(1).mean())), 1e-12)
        as_float = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))
        self.fit_state = {"offsets": as_float(offsets), "projections": as_float(projections),
                          "centres": as_float(centres), "cluster_scores": as_float(cluster_scores),
                          "larger": torch.from_numpy(larger), "spreads": as_float(spreads)}
        self.silhouettes, self.cluster_sizes = torch.from_numpy(silhouettes).float(), torch.from_numpy(sizes)
        self.class_counts, self.input_shape, self._scorer = counts, features.shape, None
        few = [k for k, n in enumerate(counts.tolist()) if 0 < n < MIN_CLASS_SAMPLES]
        self.fit_warnings = [] if not few else [
            (f"data: classes {few} have fewer than {MIN_CLASS_SAMPLES} images: not clustered, inputs predicted as "
            "them score 0")]
        for message in self.fit_warnings:
            warnings.warn(message, SampleSizeWarning, stacklevel=2)
        return self

    def _reduction(self, members: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The affine map ``z = (f − offset) @ projection.T`` of the class's reduction: (D,), (width, D)."""
        if self.reduction == "pca":
            from sklearn.decomposition import PCA

            pca = PCA(n_components=width, random_state=self.seed).fit(members)
            return pca.mean_, pca.components_
        from sklearn.decomposition import FastICA

        with warnings.catch_warnings():  # a non-converged ICA still gives a usable linear map
            warnings.simplefilter("ignore")
            ica = FastICA(n_components=width, whiten="unit-variance", max_iter=ICA_MAX_ITER,
                          random_state=self.seed).fit(members)
        return ica.mean_, ica.components_

    def as_module(self, model: nn.Module | None = None) -> ClusteringScorer:
        """``x -> (logits, score)`` in one forward pass of a private copy of ``model`` (default: the detector's)."""
        self._require_fit("ActivationClustering")
        return ClusteringScorer(self.model if model is None else model, self.layer, self.fit_state, self.score_rule)


class ClusteringScorer(FeatureTap):
    """``forward(x) -> (logits (N, K), score (N,))``: the pooled feature reduced by its predicted class's map,
    assigned to the nearer of the class's two centres, scored by that cluster (``"size"``) or by its distance to
    the larger cluster's centre (``"distance"``)."""

    def __init__(self, model: nn.Module, layer: str, state: dict[str, torch.Tensor], rule: str):
        super().__init__(model, layer)
        for name, tensor in state.items():
            self.register_buffer(name, tensor.clone())
        self.rule = rule

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feature = super().forward(x)
        return logits, self.head(logits, feature)

    def head(self, logits: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The score ``(N,)`` from the logits ``(N, K)`` and pooled feature ``(N, D)`` of one forward pass."""
        k = logits.argmax(1)
        centred = feature.float() - self.offsets[k]  # (N, D)
        reduced = torch.einsum("nd,ncd->nc", centred, self.projections[k])  # (N, width)
        distances = torch.linalg.vector_norm(reduced[:, None, :] - self.centres[k], dim=2)  # (N, 2)
        if self.rule == "size":
            return self.cluster_scores[k].gather(1, distances.argmin(1, keepdim=True)).squeeze(1)
        return distances.gather(1, self.larger[k][:, None]).squeeze(1) / self.spreads[k]
