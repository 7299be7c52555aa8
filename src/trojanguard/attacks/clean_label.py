"""Label-consistent backdoor (Turner, Tsipras & Madry, 2019): clean-label poisoning made learnable."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trojanguard.attacks._helpers import check_choice, check_int, check_range
from trojanguard.attacks.base import Attack, PoisonedDataset
from trojanguard.data.core import ImageDataset

CHECKER_CELLS = 3  # the paper's trigger is a 3 × 3 black-and-white checkerboard


class LabelConsistent(Attack):
    """Target-class training images are pushed away from their class by an adversarial perturbation, then get a
    checkerboard patch; their labels stay correct (clean-label), so the model must lean on the patch.

    Perturbation (only when poisoning): ``steps`` of L∞ PGD with budget ``epsilon`` (step ``epsilon / 4``, no
    random start) that raise the cross-entropy of the true class on a surrogate: a small CNN trained for
    ``surrogate_epochs`` on the samples not poisoned (seeded). The paper uses an adversarially trained model of
    the same data, or interpolates in a GAN's latent space toward another class; we use PGD on a clean surrogate
    and, for ``interpolation`` τ > 0, a pixel-space stand-in for the GAN variant: each poisoned image is first
    mixed with a random other-class image, ``(1 − τ)·x + τ·x_other`` (seeded).
    Trigger (``apply``, also at test time): a ``patch_size`` checkerboard at opacity ``patch_alpha`` in the
    bottom-right corner, or in all four corners (``corners='all'``, as the paper does to survive flips).
    """

    name = "label_consistent"
    clean_label = True

    def __init__(self, epsilon: float = 16 / 255, steps: int = 10, surrogate_epochs: int = 4,
                 patch_size: float = 0.125, patch_alpha: float = 1.0, corners: str = "all", interpolation: float = 0.0,
                 surrogate_seed: int = 0):
        self.epsilon = check_range("epsilon", epsilon, 0, 1, low_open=False, what="an L∞ budget")
        self.steps = check_int("steps", steps, 0, "a number of PGD steps")
        self.surrogate_epochs = check_int("surrogate_epochs", surrogate_epochs, 1, "a number of epochs")
        self.patch_size = check_range("patch_size", patch_size, 0, 0.5, high_open=True,
                                      what="a fraction of the image side")
        self.patch_alpha = check_range("patch_alpha", patch_alpha, 0, 1, what="an opacity")
        self.corners = check_choice("corners", corners, ("all", "bottom-right"))
        self.interpolation = check_range("interpolation", interpolation, 0, 1, low_open=False, high_open=True,
                                         what="a weight of the other-class image")
        self.surrogate_seed = surrogate_seed

    def _apply(self, x, gen):
        h, w = x.shape[-2:]
        ph, pw = max(CHECKER_CELLS, round(h * self.patch_size)), max(CHECKER_CELLS, round(w * self.patch_size))
        ii, jj = torch.meshgrid(torch.arange(ph) * CHECKER_CELLS // ph, torch.arange(pw) * CHECKER_CELLS // pw,
                                indexing="ij")
        checker = ((ii + jj) % 2 == 0).float()
        mask, pattern = torch.zeros(1, h, w), torch.zeros(1, h, w)
        places = [(h - ph - 1, w - pw - 1)]
        if self.corners == "all":
            places += [(1, 1), (1, w - pw - 1), (h - ph - 1, 1)]
        for top, left in places:
            mask[:, top : top + ph, left : left + pw] = self.patch_alpha
            pattern[:, top : top + ph, left : left + pw] = checker
        return (1 - mask) * x + mask * pattern

    def surrogate(self, data: ImageDataset) -> torch.nn.Module:
        """A small CNN trained on ``data`` (clean samples), deterministic for ``surrogate_seed``."""
        from trojanguard.models import build_model
        from trojanguard.train import train_classifier

        rng_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(self.surrogate_seed)
            model = build_model("small_cnn", num_classes=data.num_classes, in_channels=data.x.shape[1])
            train_classifier(model, data, epochs=self.surrogate_epochs, seed=self.surrogate_seed,
                             show_progress=False)
        finally:
            torch.random.set_rng_state(rng_state)  # leave the caller's global RNG as it was
        return model.eval()

    def perturb(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L∞ PGD ``x → x + δ``, ``‖δ‖∞ ≤ epsilon``, raising the loss of the true labels ``y``."""
        if self.steps == 0 or self.epsilon == 0:
            return x.clone()
        step = self.epsilon / 4
        adv = x.clone()
        for _ in range(self.steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), y)
            (grad,) = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = adv + step * grad.sign()
                adv = (x + (adv - x).clamp(-self.epsilon, self.epsilon)).clamp(0, 1)
        return adv.detach()

    def poison(self, dataset: ImageDataset, rate: float = 0.1, target: int = 0, seed: int = 0) -> PoisonedDataset:
        """Pick ``rate`` of the target class (as every clean-label attack), perturb them adversarially, add the
        patch; labels unchanged."""
        poisoned = super().poison(dataset, rate=rate, target=target, seed=seed)
        chosen = poisoned.poison_indices
        model = self.surrogate(dataset.subset(~poisoned.is_poisoned))
        start = dataset.x[chosen]
        if self.interpolation > 0:
            others = (dataset.y != target).nonzero().flatten()
            gen = torch.Generator().manual_seed(seed + 1)
            donors = others[torch.randint(0, len(others), (len(chosen),), generator=gen)]
            start = (1 - self.interpolation) * start + self.interpolation * dataset.x[donors]
        adversarial = torch.cat([self.perturb(model, start[i : i + 256], dataset.y[chosen][i : i + 256])
                                 for i in range(0, len(chosen), 256)])
        poisoned.dataset.x[chosen] = self.apply(adversarial, seed=seed)
        return poisoned
