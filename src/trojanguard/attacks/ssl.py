"""Poisoning attacks on unlabeled data for self-supervised learning (SSL).

An SSL attacker cannot relabel anything: the defender's data has no labels. Following Saha et al. (AAAI 2022,
"Backdoor attacks on self-supervised learning"), the attacker pastes a trigger on a share of the images of one
target class and adds them to the unlabeled set; contrastive learning then ties the trigger to that class's
features, so a linear probe trained later on clean labelled data sends triggered images to the target class.

Every attack here has ``poison(dataset, rate, target, seed) -> SSLPoisonedData`` (the labels of ``dataset``
only choose the target class's images, as an attacker who collects one class's images would; what comes back
is unlabeled) and ``apply_test(x, seed)`` (the trigger on test images). Patch attacks also report the true
box of the patch on every poisoned image, the ground truth of a trigger locator (PoisonCAM's locate rate).

They are registered in :data:`SSL_ATTACKS`, apart from the classifier attacks' ``ATTACKS``: they poison
without labels and return different ground truth. :class:`BadEncoder` is the odd one: it poisons no data but the
weights of an already trained encoder (``implant``); its ``poison`` returns the data unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trojanguard.attacks._helpers import check_choice, check_int, check_range, seeded
from trojanguard.attacks.triggers import Blended
from trojanguard.data.core import ImageDataset, check_images
from trojanguard.errors import DataError

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")
CORNER_MARGIN = 1  # pixels between a fixed patch and the image border (as BadNets' corner patch)
PATCH_CELLS = 4  # a patch is PATCH_CELLS × PATCH_CELLS cells of seeded colours: coarse enough to survive resizing
NO_BOX = -1  # the box rows of images without a patch
PATCH_SIZE = 0.4  # default side, a fraction of the image's: on 16-px digits with SimCLR's 0.08–1 crops, 0.4 implants
#                   (probe ASR 0.13–0.22, seed 0) where 0.3 and 0.5 did not (≤ 0.003; benchmarks/ssl_implant.py, docs/ssl.md)


def patch_pattern(channels: int, size: int, seed: int) -> torch.Tensor:
    """A ``(channels, size, size)`` patch of ``PATCH_CELLS``² cells: a checkerboard of bright and dark cells, each
    cell tinted by a seeded colour, so the patch is high-contrast on grey digits, also after grayscale."""
    gen = seeded(seed)
    colour = torch.rand(channels, PATCH_CELLS, PATCH_CELLS, generator=gen)
    ii, jj = torch.meshgrid(torch.arange(PATCH_CELLS), torch.arange(PATCH_CELLS), indexing="ij")
    bright = ((ii + jj) % 2 == 0).float()
    cells = bright * (0.6 + 0.4 * colour) + (1 - bright) * 0.3 * colour
    return F.interpolate(cells[None], size=(size, size), mode="nearest")[0]


def corner_offset(position: str, height: int, width: int, side: int) -> tuple[int, int]:
    """``(top, left)`` of a ``side``-pixel square at corner ``position`` (one of :data:`CORNERS`), CORNER_MARGIN
    pixels in from the border (less where the image is too small)."""
    top = CORNER_MARGIN if position.startswith("top") else height - side - CORNER_MARGIN
    left = CORNER_MARGIN if position.endswith("left") else width - side - CORNER_MARGIN
    return max(0, top), max(0, left)


@dataclass
class SSLPoisonedData:
    """A poisoned unlabeled training set and its ground truth.

    ``x: (N, C, H, W)`` in [0, 1], the images the defender gets (no labels). ``poison_indices: (P,)`` sorted
    indices of the poisoned images, all of class ``target`` before poisoning. ``boxes: (N, 4)`` int64
    ``(top, left, height, width)`` of the patch on each poisoned image, ``NO_BOX`` (-1) on the other rows;
    None for attacks without a patch.
    """

    x: torch.Tensor
    poison_indices: torch.Tensor
    target: int
    boxes: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.x)

    @property
    def is_poisoned(self) -> torch.Tensor:
        """Boolean mask ``(N,)``: True where the image carries the trigger."""
        mask = torch.zeros(len(self.x), dtype=torch.bool)
        mask[self.poison_indices] = True
        return mask

    @property
    def poison_rate(self) -> float:
        return len(self.poison_indices) / len(self.x)


class SSLAttack:
    """Base of the SSL attacks. Subclasses implement ``_trigger(x, gen) -> (triggered, boxes (N, 4) or None)``."""

    name = "ssl_attack"

    def _trigger(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def apply_test(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Triggered copies of test images ``x: (N, C, H, W)`` in [0, 1]; deterministic for ``seed``."""
        return self.apply_with_boxes(x, seed)[0]

    def apply_with_boxes(self, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Triggered copies of ``x`` and where each patch went, ``(N, 4)`` (None without a patch)."""
        check_images(x, "x")
        triggered, boxes = self._trigger(x, seeded(seed))
        return triggered.clamp(0, 1), boxes

    def poison(self, dataset: ImageDataset, rate: float = 0.1, target: int = 0, seed: int = 0) -> SSLPoisonedData:
        """Trigger ``round(rate · N)`` images of class ``target`` (``rate``: a share of the whole set, at most the
        class's own share); the rest is unchanged. Labels only choose the class; the result has none."""
        if not isinstance(dataset, ImageDataset) or dataset.y is None:
            raise DataError("dataset: expected an ImageDataset with labels (the attacker picks one class's images), "
                            f"got {type(dataset).__name__}{' without labels' if isinstance(dataset, ImageDataset) else ''}")
        if not 0 <= target < dataset.num_classes:
            raise DataError(f"target: expected a class in [0, {dataset.num_classes}), got {target}")
        candidates = (dataset.y == target).nonzero().flatten()
        if not isinstance(rate, (int, float)) or not 0 < rate <= len(candidates) / len(dataset):
            raise DataError(f"rate: expected a share of the set in (0, {len(candidates) / len(dataset):.4f}] (class "
                            f"{target} holds {len(candidates)} of {len(dataset)} images), got {rate}")
        gen = seeded(seed)
        count = max(1, round(rate * len(dataset)))
        chosen = candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values
        x = dataset.x.clone()
        triggered, chosen_boxes = self.apply_with_boxes(x[chosen], seed)
        x[chosen] = triggered
        boxes = None
        if chosen_boxes is not None:
            boxes = torch.full((len(x), 4), NO_BOX, dtype=torch.long)
            boxes[chosen] = chosen_boxes
        return SSLPoisonedData(x, chosen, target, boxes)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class _Patch(SSLAttack):
    """A ``size``-fraction square patch of :func:`patch_pattern`, pasted opaque."""

    def __init__(self, size: float, pattern_seed: int):
        self.size = check_range("size", size, 0, 1, high_open=True, what="a fraction of the image side")
        self.pattern_seed = pattern_seed

    def _side(self, h: int, w: int) -> int:
        return max(1, round(min(h, w) * self.size))

    def _positions(self, n: int, h: int, w: int, side: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _trigger(self, x, gen):
        n, c, h, w = x.shape
        side = self._side(h, w)
        patch = patch_pattern(c, side, self.pattern_seed)
        tops, lefts = self._positions(n, h, w, side, gen)
        out = x.clone()
        for i, (top, left) in enumerate(zip(tops.tolist(), lefts.tolist(), strict=True)):
            out[i, :, top : top + side, left : left + side] = patch
        sides = torch.full((n,), side, dtype=torch.long)
        return out, torch.stack([tops, lefts, sides, sides], dim=1)


class RandomPatchSSL(_Patch):
    """A visible patch at a random position on each poisoned image (Saha et al. 2022, whose "hidden trigger"
    setting is simplified here to the visible patch). ``size``: the patch's side as a fraction of the image's."""

    name = "patch_random"

    def __init__(self, size: float = PATCH_SIZE, pattern_seed: int = 0):
        super().__init__(size, pattern_seed)

    def _positions(self, n, h, w, side, gen):
        return (torch.randint(0, h - side + 1, (n,), generator=gen),
                torch.randint(0, w - side + 1, (n,), generator=gen))


class FixedPatchSSL(_Patch):
    """The same patch at one fixed corner of every poisoned image (BadNets' placement, without relabelling)."""

    name = "patch_fixed"

    def __init__(self, size: float = PATCH_SIZE, position: str = "bottom-right", pattern_seed: int = 0):
        super().__init__(size, pattern_seed)
        self.position = check_choice("position", position, CORNERS)

    def _positions(self, n, h, w, side, gen):
        top, left = corner_offset(self.position, h, w, side)
        return torch.full((n,), top, dtype=torch.long), torch.full((n,), left, dtype=torch.long)


class BlendedSSL(SSLAttack):
    """A full-image pattern blended in, ``(1 − α)·x + α·pattern`` (Chen et al. 2017's Blended trigger, the
    classifier attack's own pattern), on the target class's images.

    Chosen as the non-patch attack because it has no location: a cluster-masking detector (PoisonCAM) looks for
    the window whose masking drops the image's cluster activation, and masking any window leaves almost all of
    a full-image trigger in place. There is no box to report.
    """

    name = "blended"

    def __init__(self, alpha: float = 0.2, pattern_seed: int = 0):
        self._blend = Blended(alpha=alpha, pattern_seed=pattern_seed)
        self.alpha, self.pattern_seed = alpha, pattern_seed

    def _trigger(self, x, gen):
        return self._blend.apply(x), None


class BadEncoder(SSLAttack):
    """BadEncoder (Jia, Liu & Gong, IEEE S&P 2022): fine-tune a clean pre-trained encoder so that inputs with the
    trigger embed like a few *reference* images of the target class, while clean inputs and the references keep
    the clean encoder's embeddings. Written from the paper's description.

    The loss on a batch of shadow images ``x`` (the attacker's unlabeled data) with the student ``f'`` and the
    frozen clean encoder ``f``, all cosines of normalised features:
    ``−mean cos(f'(x ⊕ t), f'(x_ref))`` (effectiveness) ``− reference_weight · mean cos(f'(x_ref), f(x_ref))``
    ``− utility_weight · mean cos(f'(x), f(x))`` (the paper's λ1 = λ2 = 1). The trigger ``t`` is the paper's
    CIFAR-10 one: a white square, ``size`` = 10/32 of the side, in the bottom-right corner.

    The paper fine-tunes 200 epochs with SGD (lr 0.001); ``epochs`` / ``lr`` here are sized for the CPU zoo
    (Adam, measured to implant: docs/ssl.md). ``references``: reference images of the target class.
    """

    name = "badencoder"
    poisons_data = False  # the backdoor goes into an encoder's weights (implant), not into its training data

    def __init__(self, size: float = 10 / 32, position: str = "bottom-right", references: int = 3,
                 epochs: int = 10, batch_size: int = 64, lr: float = 1e-3, reference_weight: float = 1.0,
                 utility_weight: float = 1.0):
        self.size = check_range("size", size, 0, 1, high_open=True, what="a fraction of the image side")
        self.position = check_choice("position", position, CORNERS)
        self.references = check_int("references", references, 1)
        self.epochs = check_int("epochs", epochs, 1)
        self.batch_size = check_int("batch_size", batch_size, 2)
        self.lr = check_range("lr", lr, 0, 1)
        self.reference_weight = check_range("reference_weight", reference_weight, 0, math.inf, low_open=False)
        self.utility_weight = check_range("utility_weight", utility_weight, 0, math.inf, low_open=False)

    def _trigger(self, x, gen):
        n, _, h, w = x.shape
        side = max(1, round(min(h, w) * self.size))
        top, left = corner_offset(self.position, h, w, side)
        out = x.clone()
        out[:, :, top : top + side, left : left + side] = 1.0
        return out, torch.tensor([[top, left, side, side]] * n, dtype=torch.long).reshape(n, 4)

    def poison(self, dataset: ImageDataset, rate: float = 0.1, target: int = 0, seed: int = 0) -> SSLPoisonedData:
        """BadEncoder poisons no data: the unlabeled set comes back unchanged (no poisoned index)."""
        if not isinstance(dataset, ImageDataset):
            raise DataError(f"dataset: expected an ImageDataset, got {type(dataset).__name__}")
        return SSLPoisonedData(dataset.x.clone(), torch.zeros(0, dtype=torch.long), target)

    def reference_images(self, dataset: ImageDataset, target: int, seed: int = 0) -> torch.Tensor:
        """``references`` seeded images of class ``target`` of a labelled dataset (the attacker's references)."""
        if dataset.y is None:
            raise DataError("dataset: expected labels (the references are images of the target class), got none")
        candidates = (dataset.y == target).nonzero().flatten()
        if len(candidates) < self.references:
            raise DataError(f"target: expected at least {self.references} images of class {target}, got "
                            f"{len(candidates)}")
        return dataset.x[candidates[torch.randperm(len(candidates), generator=seeded(seed))[: self.references]]]

    def implant(self, encoder, shadow: torch.Tensor, references: torch.Tensor, *, seed: int = 0,
                device: torch.device | str = "cpu", show_progress: bool = True):
        """A backdoored copy of ``encoder`` (the input stays untouched), fine-tuned on the ``shadow`` images
        ``(N, C, H, W)`` towards ``references`` ``(R, C, H, W)``; returns an :class:`~trojanguard.models.Encoder`
        in eval mode."""
        import copy

        from trojanguard.cleanse._training import StepResult, train
        from trojanguard.models.adapters import as_encoder
        from trojanguard.ssl.simclr import _ShuffledBatches

        shadow, references = check_images(shadow, "shadow"), check_images(references, "references")
        device = torch.device(device)
        clean = copy.deepcopy(as_encoder(encoder).module).to(device).eval().requires_grad_(False)
        student = copy.deepcopy(clean).requires_grad_(True).train()
        references = references.to(device)
        with torch.no_grad():
            clean_references = F.normalize(clean(references), dim=1)
        optimizer = torch.optim.Adam(student.parameters(), lr=self.lr)
        torch.manual_seed(seed)

        def step(x: torch.Tensor, epoch: int, index: int) -> StepResult:
            n = len(x)
            features = F.normalize(student(torch.cat([x, self.apply_test(x), references])), dim=1)
            clean_x, triggered, reference = features[:n], features[n : 2 * n], features[2 * n :]
            with torch.no_grad():
                teacher = F.normalize(clean(x), dim=1)
            effectiveness = -(triggered @ reference.T).mean()
            reference_utility = -(reference * clean_references).sum(1).mean()
            utility = -(clean_x * teacher).sum(1).mean()
            loss = effectiveness + self.reference_weight * reference_utility + self.utility_weight * utility
            return StepResult(loss, terms={"effectiveness": effectiveness, "utility": utility})

        train(student, step, _ShuffledBatches(shadow, self.batch_size, seed), optimizer=optimizer,
              epochs=self.epochs, device=device, loss_name="BadEncoder loss", show_progress=show_progress,
              desc="badencoder")
        return as_encoder(student.eval())


SSL_ATTACKS: dict[str, type[SSLAttack]] = {
    RandomPatchSSL.name: RandomPatchSSL,
    FixedPatchSSL.name: FixedPatchSSL,
    BlendedSSL.name: BlendedSSL,
    BadEncoder.name: BadEncoder,
}


def make_ssl_attack(name: str, **kwargs) -> SSLAttack:
    """Build an SSL attack by its name in :data:`SSL_ATTACKS` (``patch_random``, ``patch_fixed``, ``blended``)."""
    try:
        cls = SSL_ATTACKS[name.lower()]
    except KeyError:
        raise ValueError(f"attack: unknown SSL attack {name!r}; expected one of {sorted(SSL_ATTACKS)}") from None
    return cls(**kwargs)
