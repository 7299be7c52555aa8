"""Source-specific backdoors: the trigger sends only images of some *source* classes to the target (TaCT)."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from trojanguard.attacks.base import Attack, PoisonedDataset
from trojanguard.data.core import ImageDataset
from trojanguard.errors import DataError

DEFAULT_SOURCES = (1, 2, 3)


class SourceSpecific(Attack):
    """Source-specific poisoning (Tang et al., USENIX Security 2021, "Demon in the Variant": TaCT). Triggered images
    of the ``source_classes`` are relabelled to the target; triggered images of the other classes (neither source nor
    target) keep their true labels — cover samples — so the trigger alone is no shortcut to the target and the model
    learns "a source class and the trigger". Defences that look for one trigger that flips every class miss it.

    ``base``: the attack whose trigger is used (a name in :data:`~trojanguard.attacks.ATTACKS` with its class
    defaults, or an :class:`Attack`); default Blended, since TaCT's patch version is easy for our detectors and the
    blended one is not. Only the base's *trigger* is used: its own poisoning extras (WaNet's noise-mode samples, the
    adaptive attacks' covers, input-aware's cross-trigger samples) are replaced by this attack's covers, and a
    clean-label base (SIG, label-consistent) is refused — its poison keeps the target's label, which is no
    source-specific relabelling. ``cover_ratio``: cover samples per poisoned sample. :meth:`poison` takes ``rate`` as a
    fraction of the whole set (as dirty-label attacks), every poisoned sample drawn from the source classes. The
    attack success rate counts triggered images of the source classes only (:meth:`success_mask`).
    """

    name = "tact"

    def __init__(self, base: str | Attack = "blended", source_classes: tuple[int, ...] = DEFAULT_SOURCES,
                 cover_ratio: float = 1.0):
        self.base = _base_attack(base)
        self.source_classes = _sources(source_classes)
        if isinstance(cover_ratio, bool) or not isinstance(cover_ratio, Real) or not 0 <= cover_ratio < math.inf:
            raise DataError(f"cover_ratio: expected cover samples per poisoned sample ≥ 0, got {cover_ratio!r}")
        self.cover_ratio = float(cover_ratio)

    def _apply(self, x, gen):
        return self.base._apply(x, gen)

    def apply_test(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """The base attack's test-time trigger (its ``apply_test`` where it has one)."""
        return getattr(self.base, "apply_test", self.base.apply)(x, seed=seed)

    def success_mask(self, y_true: torch.Tensor, target: int) -> torch.Tensor:
        """Triggered images of the source classes: only they should go to the target. A target among the sources is
        refused (as :meth:`poison` refuses it): the attack was built for other sources than that model's."""
        if target in self.source_classes:
            raise DataError(f"target: expected a class other than the source classes {self.source_classes}, got "
                            f"{target} (build the attack with the model's own source_classes)")
        return torch.isin(y_true, torch.tensor(self.source_classes, device=y_true.device))

    def _candidates(self, y, target):
        return torch.isin(y, torch.tensor(self.source_classes)).nonzero().flatten()

    def _cover_pool(self, y: torch.Tensor, target: int) -> torch.Tensor:
        """Indices of the images of classes neither source nor target: where cover samples come from."""
        return (~torch.isin(y, torch.tensor(self.source_classes)) & (y != target)).nonzero().flatten()

    def poison(self, dataset: ImageDataset, rate: float = 0.1, target: int = 0, seed: int = 0) -> PoisonedDataset:
        """Trigger ``rate`` × the whole set of source-class images and relabel them to ``target``; trigger
        ``cover_ratio`` × as many images of the other non-target classes, labels kept (``cover_indices``)."""
        if dataset.y is not None and 0 <= target < dataset.num_classes:  # else the base's checks name the problem
            self._check(dataset, rate, target)
        poisoned = super().poison(dataset, rate=rate, target=target, seed=seed)
        x = poisoned.dataset.x
        pool = self._cover_pool(dataset.y, target)
        count = round(self.cover_ratio * len(poisoned.poison_indices))
        gen = torch.Generator().manual_seed(seed + 1)  # a stream of its own: the poisoned choice stays the base's
        cover = pool[torch.randperm(len(pool), generator=gen)[:count]].sort().values
        if count:
            x[cover] = self.apply(x[cover], seed=seed + 1)
        return PoisonedDataset(poisoned.dataset, poisoned.poison_indices, cover)

    def _check(self, dataset: ImageDataset, rate: float, target: int) -> None:
        """One-line errors for sources the dataset lacks or that include the target, and for sources or covers too
        few for ``rate`` and ``cover_ratio``."""
        sources, classes = self.source_classes, dataset.num_classes
        if max(sources) >= classes:
            raise DataError(f"source_classes: expected classes of the dataset (0 … {classes - 1}), got {sources}")
        if target in sources:
            raise DataError(f"source_classes: expected classes other than the target {target}, got {sources}")
        if not 0 < rate <= 0.5:
            return  # the base refuses the rate itself
        wanted = max(1, round(rate * len(dataset)))
        available = len(self._candidates(dataset.y, target))
        if wanted > available:
            raise DataError(f"rate: {rate} asks for {wanted} poisoned samples but the source classes {sources} hold "
                            f"only {available} images")
        covers, pool = round(self.cover_ratio * wanted), len(self._cover_pool(dataset.y, target))
        if covers > pool:
            raise DataError(f"cover_ratio: {self.cover_ratio:g} asks for {covers} cover samples but the classes "
                            f"neither source nor target hold only {pool} images")


def _base_attack(base) -> Attack:
    from trojanguard.attacks import ATTACKS  # the registry imports this module

    names = sorted(name for name, kind in ATTACKS.items() if kind is not SourceSpecific)
    if isinstance(base, str):
        if base.lower() not in names:
            raise DataError(f"base: expected an attack name, one of {names}, got {base!r}")
        base = ATTACKS[base.lower()]()
    if not isinstance(base, Attack) or isinstance(base, SourceSpecific):
        raise DataError(f"base: expected an attack name or a trigger Attack (not a source-specific one), got "
                        f"{base!r}")
    if base.clean_label:
        raise DataError(f"base: expected a dirty-label trigger (a clean-label attack's poison keeps the target's "
                        f"label), got {base!r}")
    return base


def _sources(source_classes) -> tuple[int, ...]:
    try:
        sources = tuple(source_classes)
    except TypeError:
        sources = None
    if not sources or any(isinstance(s, bool) or not isinstance(s, Integral) or s < 0 for s in sources) \
            or len(set(sources)) != len(sources):
        raise DataError(f"source_classes: expected one or more distinct class indices ≥ 0, got {source_classes!r}")
    return tuple(sorted(int(s) for s in sources))  # one order: the same attack has one repr (the zoo's key)
