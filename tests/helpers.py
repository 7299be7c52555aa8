"""What several test folders share: repository paths, input builders and the tolerances kernel tests state.

Imported as ``helpers`` (``tests/`` is on ``sys.path`` through ``tests/conftest.py``).
"""

from pathlib import Path

import torch

from trojanguard.models import build_model
from trojanguard.ops import MaskStepParams, uniform_noise

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# mask_step: one Adam step of the mask; the parameters every backend test runs with.
MASK_STEP_PARAMS = MaskStepParams(lr=0.1, beta1=0.1, beta2=0.1, eps=1e-8, l1_weight=0.01, tv_weight=1.0, step=3)
# fp32 state (θ, Adam moments) and fp32 x_adv against the reference: one step of fp32 elementwise math with
# tanh / sqrt may differ in the last ulps between libm, Triton and CUDA. δ (the noise) must be bit-identical.
FP32_TOLERANCE = {"atol": 2e-5, "rtol": 1e-5}


def low_precision_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """bf16 / fp16 x_adv against the reference's: one rounding of nearly the same fp32 value, so at most about one
    ulp of the low-precision dtype apart (flash-attention's rule: twice PyTorch's own rounding error)."""
    return {"atol": 1e-6, "rtol": 2 * torch.finfo(dtype).eps}


def mask_step_inputs(n: int, c: int, m: int, h: int, w: int, *, seed: int = 0, x_dtype=torch.float32,
                     grad_dtype=torch.float32, normalise: bool = True, wide_seeds: bool = False, step: int = MASK_STEP_PARAMS.step,
                     device="cpu"):
    """Random inputs of mask_step: ``([θ, m1, m2, x, δ, grad, seeds], mean, std)`` with θ/m1/m2 ``(n, m, h, w)``,
    x/δ/grad ``(n, c, h, w)``, δ the noise of Adam step ``step``. ``wide_seeds``: seeds negative and beyond 32 bits (they wrap like uint32)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, m, h, w, generator=g)
    exp_avg = torch.randn(n, m, h, w, generator=g) * 1e-2
    exp_avg_sq = torch.rand(n, m, h, w, generator=g) * 1e-3
    x = torch.rand(n, c, h, w, generator=g).to(x_dtype)
    seeds = (torch.randint(-(2**40), 2**40, (n,), generator=g) if wide_seeds
             else torch.randint(0, 2**31, (n,), generator=g))
    delta = uniform_noise(seeds, step, c)
    grad = (torch.randn(n, c, h, w, generator=g) * 1e-2).to(grad_dtype)
    mean = torch.linspace(0.4, 0.6, c).to(device) if normalise else None
    std = torch.linspace(0.2, 0.3, c).to(device) if normalise else None
    return [t.to(device) for t in (theta, exp_avg, exp_avg_sq, x, delta, grad, seeds)], mean, std


def small_classifier(num_classes: int = 4, seed: int = 0) -> torch.nn.Module:
    """An untrained small CNN in eval mode (for plumbing tests that need a real classifier, not a good one)."""
    torch.manual_seed(seed)
    return build_model("small_cnn", num_classes=num_classes).eval()


def random_images(n: int, size: int = 16, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """``(n, channels, size, size)`` uniform images in [0, 1] from a seeded generator."""
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def head_scores(detector, features) -> torch.Tensor:
    """Fit a one-pass feature detector on extracted ``features`` and score them through its module's ``head`` (no
    forward pass: synthetic features need no model to produce them)."""
    detector.fit_features(features)
    return detector.as_module().head(features.logits, features.features.float())


def held_out_clean_and_triggered(entry, start: int, count: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` clean test images of a zoo entry from index ``start`` (after those used to calibrate) and ``count``
    triggered test images whose true class is not the target; returns ``(x, is_triggered)``."""
    clean = entry.test.x[start : start + count]
    triggered = entry.triggered_test()[entry.test.y != entry.config.target][:count]
    truth = torch.cat([torch.zeros(len(clean), dtype=torch.bool), torch.ones(len(triggered), dtype=torch.bool)])
    return torch.cat([clean, triggered]), truth


def screened_draw(poisoned: torch.Tensor, seed: int, fraction: float = 0.2) -> torch.Tensor:
    """Sorted indices of a seeded stratified ``fraction`` of a training set (poisoned and clean alike), drawn as
    ``benchmarks/detect_families.py`` draws its screened sets (``screened_subset``)."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda idx: idx[torch.randperm(len(idx), generator=g)[: max(1, round(fraction * len(idx)))]]
    return torch.cat([pick(torch.nonzero(poisoned).flatten()), pick(torch.nonzero(~poisoned).flatten())]).sort().values
