"""The attack protocol: trigger inputs, and poison a labelled dataset at a rate toward a target."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trojanguard.data.core import ImageDataset, check_images
from trojanguard.errors import DataError


@dataclass
class PoisonedDataset:
    """A poisoned training set: the indices of the samples that carry the trigger (relabelled to the target, or the
    target's own for a clean-label attack), and of the *cover* samples — images the attack also altered but left
    with their true labels (WaNet's noise mode, the adaptive attacks' cover samples, input-aware's cross-trigger
    samples). Cover samples are not backdoor samples, but neither are they untouched: benchmarks report how a
    detector ranks them apart."""

    dataset: ImageDataset
    poison_indices: torch.Tensor
    cover_indices: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def is_poisoned(self) -> torch.Tensor:
        """Boolean mask ``(N,)``: True where the sample was poisoned."""
        return self._mask(self.poison_indices)

    @property
    def is_cover(self) -> torch.Tensor:
        """Boolean mask ``(N,)``: True where the attack altered the image but kept its true label."""
        return self._mask(self.cover_indices)

    def _mask(self, indices: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(len(self.dataset), dtype=torch.bool)
        mask[indices] = True
        return mask


class Attack:
    """Base of every attack. Subclasses implement ``_apply(x)`` on ``(N, C, H, W)`` in [0, 1]."""

    name = "attack"
    clean_label = False  # clean-label attacks poison only target-class samples and keep their labels

    def apply(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Return triggered copies of ``x: (N, C, H, W)`` in [0, 1]; deterministic for ``seed``."""
        check_images(x, "x")
        gen = torch.Generator().manual_seed(seed)
        return self._apply(x, gen).clamp(0, 1)

    def _apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def poison(self, dataset: ImageDataset, rate: float = 0.1, target: int = 0, seed: int = 0) -> PoisonedDataset:
        """Trigger and relabel a ``rate`` fraction of the samples.

        Dirty-label attacks pick from non-target samples, ``rate`` a fraction of the whole set; clean-label
        attacks (SIG) pick from target-class samples only, ``rate`` a fraction of that class.
        """
        if dataset.y is None:
            raise DataError("poison: the dataset has no labels")
        if not 0 < rate <= (1 if self.clean_label else 0.5):
            raise DataError(f"rate: expected a poison rate in (0, {1 if self.clean_label else 0.5}], got {rate}")
        if not 0 <= target < dataset.num_classes:
            raise DataError(f"target: expected a class in [0, {dataset.num_classes}), got {target}")
        gen = torch.Generator().manual_seed(seed)
        candidates = self._candidates(dataset.y, target)
        n_poison = max(1, round(rate * (len(candidates) if self.clean_label else len(dataset))))
        if n_poison > len(candidates):
            raise DataError(
                f"rate: {rate} asks for {n_poison} poisoned samples but only {len(candidates)} are eligible"
            )
        chosen = candidates[torch.randperm(len(candidates), generator=gen)[:n_poison]].sort().values
        x, y = dataset.x.clone(), dataset.y.clone()
        x[chosen] = self.apply(x[chosen], seed=seed)
        y[chosen] = target
        cover = self._poison_extra(x, y, chosen, gen)
        return PoisonedDataset(ImageDataset(x, y, dataset.class_names), chosen,
                               torch.zeros(0, dtype=torch.long) if cover is None else cover)

    def _candidates(self, y: torch.Tensor, target: int) -> torch.Tensor:
        """Indices of the samples that may be poisoned, given labels ``y: (N,)``: the target class for a clean-label
        attack, every other class for a dirty-label one."""
        return (y == target).nonzero().flatten() if self.clean_label else (y != target).nonzero().flatten()

    def success_mask(self, y_true: torch.Tensor, target: int) -> torch.Tensor:
        """Which triggered test images the attack success rate counts, ``(N,)`` bool from true labels ``(N,)``:
        those whose true class is not the target (a source-specific attack narrows it to its source classes)."""
        return y_true != target

    def _poison_extra(self, x, y, chosen, gen) -> torch.Tensor | None:
        """Alter further samples of ``x`` in place, labels kept (cover samples); return their indices (None: none)."""
        return None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
