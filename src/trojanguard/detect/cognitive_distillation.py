"""Cognitive Distillation (Huang et al., ICLR 2023): the smallest mask that keeps the model's output.

For each input, Adam learns a mask ``m = (tanh θ + 1)/2`` such that ``x·m + (1 − m)·δ`` (δ a random flat
colour redrawn every step) gives the same logits (CD-L) or features (CD-F) as ``x``, under an L1 and a
total-variation penalty. A backdoor trigger alone drives the prediction, so poisoned inputs keep a much
smaller mask: ``score = 1 − mean(m)`` (higher = more suspicious; the paper's ``Σ m`` up to sign and scale).

Everything outside the network runs in one fused op per step (:func:`trojanguard.ops.mask_step`); the
network needs only an input gradient (weights frozen, never differentiated). Each sample draws δ from its own
counter-based stream keyed by its index in the data, so results do not depend on batch size or order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from trojanguard.data.batching import count_images, iter_image_batches
from trojanguard.detect.base import Detector
from trojanguard.errors import DataError, check_choice, check_positive_int
from trojanguard.models import Normalize
from trojanguard.models.adapters import Classifier, as_classifier
from trojanguard.models.features import LayerOutput, default_feature_layer, model_device, working_copy
from trojanguard.ops import (
    MaskStepParams,
    blend_reference,
    mask_from_theta,
    mask_step,
    regularizer_reference,
    uniform_noise,
)
from trojanguard.progress import progress

MODES = ("probabilities", "logits", "features")
# Defaults per mode: Adam lr, γ (L1 weight per pixel, the paper's α) and β (TV weight). CD-L and CD-F are the
# authors' (METHODS.md §1). CD-P (ours) distils the predicted distribution, with γ = MASK_COST / (H·W).
MODE_DEFAULTS = {
    "probabilities": {"lr": 0.1, "alpha": None, "beta": 1.0},
    "logits": {"lr": 0.1, "alpha": 0.01, "beta": 1.0},
    "features": {"lr": 0.05, "alpha": 0.001, "beta": 10.0},
}
MASK_COST = 1.0  # CD-P: keeping the whole image costs as much as changing the prediction completely
ADAM_BETAS = (0.1, 0.1)
ADAM_EPS = 1e-8
THETA_INIT = 1.0  # m ≈ 0.881 at the start
REFERENCE_PIXELS = 32 * 32  # resolution the authors' γ was chosen at (scale_alpha_by_resolution)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EARLY_STOP_EVERY = 10  # steps between convergence checks when early_stop is set
SEED_MIX = 0x9E3779B1
DISTANCE_EMA = 0.9  # smoothing of the per-sample distance over the last ~10 steps (δ is random each step)  # spreads detector seeds over the 31-bit per-sample seed space


@dataclass
class DistillationResult:
    """Per-sample outcome of CD. masks: (N, M, H, W); patterns = x·m: (N, C, H, W); l1 = Σ m: (N,);
    steps: optimisation steps each sample ran (< ``steps`` only with early stop)."""

    masks: torch.Tensor
    patterns: torch.Tensor
    l1: torch.Tensor
    steps: torch.Tensor
    objective: torch.Tensor

    FIELDS = ("masks", "patterns", "l1", "steps", "objective")

    @property
    def scores(self) -> torch.Tensor:
        """1 − mean(m): higher = smaller mask = more suspicious."""
        return 1 - self.masks.flatten(1).mean(1)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU executes bf16 matrix math natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and several times slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of the network (None = fp32). 'auto': bf16 on CUDA devices that support it and on CPUs
    with native bf16, fp32 elsewhere. θ and the Adam moments always stay fp32."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


class CognitiveDistillation(Detector):
    """Cognitive Distillation detector of backdoor-triggered inputs.

    Args:
        model: any ``nn.Module`` classifier taking ``(N, C, H, W)`` input; left exactly as handed in.
        mode: what the mask must preserve — ``"probabilities"`` (CD-P, default: the predicted class
            distribution, distance = total variation), ``"logits"`` (CD-L, the paper) or ``"features"`` (CD-F,
            the paper: the output of ``layer``). CD-P is ours: on models whose clean inputs are recognised from
            few pixels, the logit distance makes poisoned inputs keep their content *and* the trigger (so
            their masks are larger, AUROC < 0.5); preserving the decision only restores CD's premise
            (benchmarks/RESULTS.md).
        layer: module name for CD-F (default: the last 4-D output before global pooling).
        steps, lr, alpha (γ, L1 weight per pixel of an unnormalised mask sum), beta (TV weight): defaults
            per mode when None — the authors' for CD-L/CD-F; for CD-P γ = MASK_COST/(H·W), i.e. keeping the
            whole image costs as much as changing the prediction entirely, at any resolution.
        mask_channels: 1 (one mask shared by all channels, the paper) or C (one per channel).
        batch_size: images optimised together (memory vs speed only; results do not depend on it).
        preprocess: what the model expects applied to [0, 1] pixels — None, ``(mean, std)``, a
            :class:`~trojanguard.models.Normalize` (both folded into the fused step) or any differentiable
            callable; it is applied to the reference pass and to every perturbed input alike.
        backend: op backend for the fused step (``"auto"``, ``"reference"``, ``"cpp"``, ``"cuda"``, ``"triton"``).
        precision: network precision (``"auto"``: bf16 where the hardware runs it natively, else fp32).
        channels_last: run the network in channels_last memory format (faster convolutions on CPU and GPU).
        fuse_conv_bn: fold eval-mode BatchNorm into convolutions (CD-L only; skipped if the model is not
            FX-traceable).
        scale_alpha_by_resolution: divide γ by (H·W)/(32·32) so the L1 term weighs the same at any size
            (the authors' γ grows ×49 in effect from 32 to 224 px).
        early_stop: stop a sample once no mask value moved more than this over 10 steps (None: run all steps).
        compile: run the network under ``torch.compile`` (True: the default backend, or a backend name);
            pays a one-off compilation for faster steps on large jobs. Not with ``mode="features"``.
        cuda_graphs: on CUDA devices, capture the whole step loop of a batch as one CUDA graph after the first
            full batch and replay it for the rest (removes the launch overhead of small networks; not with
            ``early_stop`` or ``compile``).
        seed: base of the per-sample noise streams.
        show_progress: progress bar over batches.
    """

    model_kind = Classifier  # the kind of model CD needs: logits (CD-P, CD-L) or a layer's output (CD-F)

    def __init__(self, model: nn.Module, *, mode: str = "probabilities", layer: str | None = None, steps: int = 100,
                 lr: float | None = None, alpha: float | None = None, beta: float | None = None,
                 mask_channels: int = 1, batch_size: int = 256, preprocess=None, backend: str = "auto",
                 precision: str = "auto", channels_last: bool = True, fuse_conv_bn: bool = True,
                 scale_alpha_by_resolution: bool = False, early_stop: float | None = None, seed: int = 0,
                 compile: bool | str = False, cuda_graphs: bool = True, show_progress: bool = True):
        model = as_classifier(model).module
        check_choice("mode", mode, MODES)
        check_positive_int("steps", steps)
        check_positive_int("batch_size", batch_size)
        if early_stop is not None and early_stop <= 0:
            raise ValueError(f"early_stop: expected a positive tolerance or None, got {early_stop}")
        defaults = MODE_DEFAULTS[mode]
        self.model, self.mode, self.layer, self.steps = model, mode, layer, steps
        self.lr = defaults["lr"] if lr is None else lr
        self.alpha = defaults["alpha"] if alpha is None else alpha
        self.beta = defaults["beta"] if beta is None else beta
        self.mask_channels, self.batch_size, self.backend = mask_channels, batch_size, backend
        self.mean, self.std, self.preprocess = _split_preprocess(preprocess)
        resolve_precision(precision, torch.device("cpu"))  # validates the name
        self.precision, self.channels_last, self.fuse_conv_bn = precision, channels_last, fuse_conv_bn
        self.scale_alpha_by_resolution, self.early_stop = scale_alpha_by_resolution, early_stop
        if compile and mode == "features":
            raise ValueError("compile: not supported with mode='features' (the layer capture stops the forward pass)")
        self.seed, self.show_progress, self.compile, self.cuda_graphs = seed, show_progress, compile, cuda_graphs

    def __repr__(self) -> str:
        keys = ("mode", "layer", "steps", "lr", "alpha", "beta", "mask_channels", "batch_size", "backend",
                "precision", "early_stop", "cuda_graphs", "seed")
        return f"CognitiveDistillation({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    # ------------------------------------------------------------------------------------------ public API
    def distill(self, x) -> DistillationResult:
        """Masks, cognitive patterns and mask L1 norms of every input in ``x`` (tensor, Dataset, DataLoader)."""
        parts = list(self.iter_distill(x, keep_masks=True))
        if not parts:
            raise DataError("x: no images to distil")
        return DistillationResult(*(torch.cat([getattr(r, f) for _, r in parts]) for f in DistillationResult.FIELDS))

    def score(self, x) -> torch.Tensor:
        """Suspicion ``(N,)`` = 1 − mean mask value; higher = more suspicious."""
        parts = [r.scores for _, r in self.iter_distill(x, keep_masks=False)]
        if not parts:
            raise DataError("x: no images to score")
        return torch.cat(parts)

    def iter_distill(self, x, *, keep_masks: bool = True, first_index: int = 0,
                     sample_indices: torch.Tensor | None = None) -> Iterator[tuple[int, DistillationResult]]:
        """Stream ``(start index, result of one batch)``; with ``keep_masks=False`` masks hold only what
        ``scores`` needs (the per-sample mean, as an (N, 1, 1, 1) tensor) and patterns are empty.

        Each sample draws its noise from the stream of its index in the whole dataset: ``first_index + i`` for
        ``x[i]`` (``first_index`` = index of ``x[0]``), or ``sample_indices[i]`` (``(N,)`` int) for samples picked
        from anywhere in it. So a dataset distilled in pieces (a resumed run, a few samples recomputed) gets the
        masks of one uninterrupted call."""
        if first_index < 0:
            raise ValueError(f"first_index: expected an index >= 0, got {first_index}")
        if sample_indices is not None:
            sample_indices = torch.as_tensor(sample_indices, dtype=torch.int64).flatten()
            if first_index:
                raise ValueError("first_index, sample_indices: pass one of them")
            if (sample_indices < 0).any():
                raise ValueError("sample_indices: expected indices >= 0")
            count = count_images(x)
            if count is not None and count != len(sample_indices):
                raise DataError(f"sample_indices: expected one index per image ({count}), got {len(sample_indices)}")
        device = model_device(self.model)
        net, restore = working_copy(self.model, channels_last=self.channels_last,
                                    fuse_conv_bn=self.fuse_conv_bn and self.mode != "features")
        try:
            target = self._target(net, x, device)
            if self.compile:
                backend = self.compile if isinstance(self.compile, str) else "inductor"
                target = torch.compile(target, backend=backend, dynamic=False)
            batches = progress(iter_image_batches(x, self.batch_size), desc="cognitive distillation",
                               enable=self.show_progress, total=_num_batches(x, self.batch_size))
            graphs = {} if self.cuda_graphs and not self.compile and not self.early_stop else None
            for xb, start in batches:
                if sample_indices is None:
                    indices = torch.arange(first_index + start, first_index + start + len(xb))
                else:
                    indices = sample_indices[start : start + len(xb)]
                yield first_index + start, self._distill_batch(target, xb.to(device, torch.float32), indices,
                                                               keep_masks, graphs)
        finally:
            restore()

    # ------------------------------------------------------------------------------------------ internals
    def _target(self, net: nn.Module, data, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function whose output CD preserves: logits, or the chosen layer's output."""
        layer = self.layer
        if self.mode == "features" and layer is None:
            first, _ = next(iter_image_batches(data, 2), (None, 0))
            if first is None:
                raise DataError("x: no images to distil")
            example = self._step_input(first[:2].to(device, torch.float32))
            layer = default_feature_layer(net, self._network_input(example))
            self.layer = layer
        if self.mode == "probabilities":
            return PredictedDistribution(net)
        return LayerOutput(net, layer if self.mode == "features" else None)

    def _network_input(self, z: torch.Tensor) -> torch.Tensor:
        """What the network sees for ``z``, the fused step's output (normalised pixels when (mean, std) are
        folded in, raw pixels otherwise)."""
        return z if self.preprocess is None else self.preprocess(z)

    def _step_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in the fused step's output space (normalised when (mean, std) are folded in)."""
        if self.mean is None:
            return pixels
        return blend_reference(pixels, torch.ones_like(pixels[:, :1]), torch.zeros_like(pixels[:, :, :1, :1]),
                               self.mean.to(pixels), self.std.to(pixels))

    def _alpha_per_pixel(self, h: int, w: int) -> float:
        if self.alpha is None:
            return MASK_COST / (h * w)
        return self.alpha / (h * w / REFERENCE_PIXELS) if self.scale_alpha_by_resolution else self.alpha

    def _distill_batch(self, target, x: torch.Tensor, indices: torch.Tensor, keep_masks: bool,
                       graphs: dict | None = None) -> DistillationResult:
        pixels, (n, c, h, w) = x, x.shape
        if self.mask_channels not in (1, c):
            raise DataError(f"mask_channels: expected 1 or the images' channel count {c}, got {self.mask_channels}")
        device = x.device
        autocast_dtype = resolve_precision(self.precision, device)
        mean, std = (None, None) if self.mean is None else (self.mean.to(device), self.std.to(device))
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format

        def network(z: torch.Tensor) -> torch.Tensor:
            # cache_enabled=False: each forward is its own autocast region (nothing to reuse), and cached weight
            # casts must not outlive a CUDA graph capture.
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None, cache_enabled=False):
                return target(self._network_input(z).contiguous(memory_format=memory_format)).float()

        seeds = ((indices.to(torch.int64) + self.seed * SEED_MIX) & 0x7FFFFFFF).to(device)
        problem = _Problem(network, mean, std, self._alpha_per_pixel(h, w))
        steps_run = torch.full((n,), self.steps, dtype=torch.int64)
        if self.early_stop:
            masks, distances = self._optimise_early_stop(problem, x, seeds, steps_run)
        elif graphs is not None and _graphs_usable(device):
            masks, distances = _graphed(graphs, self._optimise, problem, x, seeds, self.batch_size)
        else:
            masks, distances = self._optimise(problem, x, seeds)
        l1, tv = regularizer_reference(masks)
        objective = (distances + problem.alpha * l1 + self.beta * tv).cpu()
        if keep_masks:
            return DistillationResult(masks.cpu(), (pixels * masks).cpu(), l1.cpu(), steps_run, objective)
        mean_mask = masks.flatten(1).mean(1).view(-1, 1, 1, 1)
        return DistillationResult(mean_mask.cpu(), torch.empty(0), l1.cpu(), steps_run, objective)

    def _start(self, problem: _Problem, x: torch.Tensor, seeds: torch.Tensor) -> _State:
        """Reference output of the clean inputs and the optimisation state before step 1."""
        with torch.no_grad():
            try:
                reference = problem.network(self._step_input(x))
            except RuntimeError as exc:
                raise DataError(f"x: the model cannot take images of shape {tuple(x.shape[1:])}: {exc}") from exc
        n, c, h, w = x.shape
        theta = torch.full((n, self.mask_channels, h, w), THETA_INIT, device=x.device)
        delta = uniform_noise(seeds, 1, c)
        x_adv = blend_reference(x, mask_from_theta(theta), delta, problem.mean, problem.std)
        return _State(x, seeds, reference, theta, torch.zeros_like(theta), torch.zeros_like(theta), delta, x_adv,
                      torch.zeros(n, device=x.device))

    def _step(self, problem: _Problem, state: _State, step: int) -> None:
        """One optimisation step: forward + input gradient on the network, then the fused mask step."""
        x_adv = state.x_adv.requires_grad_(True)
        distance = (problem.network(x_adv) - state.reference).abs().flatten(1).mean(1)
        (grad,) = torch.autograd.grad(distance.sum(), x_adv)
        state.distance_ema.mul_(DISTANCE_EMA).add_(distance.detach(), alpha=1 - DISTANCE_EMA)
        params = MaskStepParams(self.lr, *ADAM_BETAS, ADAM_EPS, problem.alpha, self.beta, step)
        state.delta, state.x_adv = mask_step(state.theta, state.exp_avg, state.exp_avg_sq, state.x, state.delta, grad,
                                             state.seeds, params, problem.mean, problem.std, torch.float32,
                                             backend=self.backend)

    def _optimise(self, problem: _Problem, x: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All steps for every sample: (masks, smoothed distances). Device work only, no host synchronisation,
        so the whole loop can be captured as one CUDA graph."""
        state = self._start(problem, x, seeds)
        for step in range(1, self.steps + 1):
            self._step(problem, state, step)
        return mask_from_theta(state.theta), state.distance_ema / (1 - DISTANCE_EMA**self.steps)

    def _optimise_early_stop(self, problem: _Problem, x: torch.Tensor, seeds: torch.Tensor,
                             steps_run: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`_optimise`, but a sample leaves the batch once its mask stops moving (``early_stop``);
        each one stops by its own criterion only. Fills ``steps_run``."""
        state = self._start(problem, x, seeds)
        masks = torch.empty_like(state.theta)
        distances = torch.empty(len(x), device=x.device)
        active = torch.arange(len(x), device=x.device)
        previous = mask_from_theta(state.theta)
        for step in range(1, self.steps + 1):
            self._step(problem, state, step)
            if step % EARLY_STOP_EVERY or step == self.steps:
                continue
            mask = mask_from_theta(state.theta)
            done = (mask - previous).abs().flatten(1).amax(1) < self.early_stop
            if done.any():
                masks[active[done]] = mask[done]
                distances[active[done]] = state.distance_ema[done] / (1 - DISTANCE_EMA**step)
                steps_run[active[done].cpu()] = step
                keep = ~done
                active, mask = active[keep], mask[keep]
                state.select(keep)
                if len(active) == 0:
                    return masks, distances
            previous = mask
        masks[active] = mask_from_theta(state.theta)
        distances[active] = state.distance_ema / (1 - DISTANCE_EMA**self.steps)
        return masks, distances


@dataclass
class _Problem:
    """What stays fixed while one batch is optimised."""

    network: Callable[[torch.Tensor], torch.Tensor]
    mean: torch.Tensor | None
    std: torch.Tensor | None
    alpha: float


@dataclass
class _State:
    """Per-sample optimisation state of one batch (all tensors share the batch dimension)."""

    x: torch.Tensor
    seeds: torch.Tensor
    reference: torch.Tensor
    theta: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    delta: torch.Tensor
    x_adv: torch.Tensor
    distance_ema: torch.Tensor

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the samples where ``keep`` is True."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name)[keep])


# ---------------------------------------------------------------------------------------------- CUDA graphs
def _graphs_usable(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


class _GraphedLoop:
    """The whole step loop of one batch shape, captured once as a CUDA graph and replayed for every later batch:
    a step is hundreds of small kernels (network forward, input gradient, fused step), so on a GPU the launches,
    not the arithmetic, bound the eager loop. Inputs are copied into static buffers; outputs are cloned."""

    def __init__(self, optimise: Callable, problem: _Problem, x: torch.Tensor, seeds: torch.Tensor):
        self.x, self.seeds = x.clone(), seeds.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = optimise(problem, self.x, self.seeds)

    def __call__(self, x: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.x.copy_(x)
        self.seeds.copy_(seeds)
        self.graph.replay()
        return tuple(out.clone() for out in self.outputs)


def _graphed(graphs: dict, optimise: Callable, problem: _Problem, x: torch.Tensor, seeds: torch.Tensor,
             batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :meth:`CognitiveDistillation._optimise` through a CUDA graph of a full batch: the first full batch of a
    shape runs eagerly (it warms up kernels and libraries) and is then captured; a smaller last batch is padded
    (samples are independent, so padding changes nothing) once a graph exists."""
    n = len(x)
    key = (tuple(x.shape[1:]), x.dtype, x.device)
    loop = graphs.get(key)
    if loop is None:
        result = optimise(problem, x, seeds)
        if n == batch_size:
            torch.cuda.synchronize(x.device)
            graphs[key] = _GraphedLoop(optimise, problem, x, seeds)
        return result
    if n < batch_size:
        pad = batch_size - n
        x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
        seeds = torch.cat([seeds, seeds[-1:].expand(pad)])
    masks, distances = loop(x, seeds)
    return masks[:n], distances[:n]


class PredictedDistribution(nn.Module):
    """softmax(logits)·K/2: the mean absolute difference of two such outputs is the total-variation distance
    between the predicted class distributions, in [0, 1] whatever the number of classes K."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x).float()
        if logits.dim() != 2:
            raise DataError(f"mode='probabilities': expected (N, K) logits from the model, got {tuple(logits.shape)}")
        return torch.softmax(logits, dim=1) * (logits.shape[1] / 2)


def _split_preprocess(preprocess) -> tuple[torch.Tensor | None, torch.Tensor | None, Callable | None]:
    """(mean, std) to fold into the fused step, or a callable applied on the network side."""
    if preprocess is None:
        return None, None, None
    if isinstance(preprocess, Normalize):
        return preprocess.mean.flatten().float(), preprocess.std.flatten().float(), None
    if isinstance(preprocess, (tuple, list)) and len(preprocess) == 2:
        mean, std = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in preprocess)
        if mean.shape != std.shape or (std <= 0).any():
            raise ValueError("preprocess: expected (mean, std) of equal length with std > 0")
        return mean, std, None
    if callable(preprocess):
        return None, None, preprocess
    raise TypeError(f"preprocess: expected None, (mean, std), Normalize or a callable, got {type(preprocess).__name__}")


def _num_batches(data, batch_size: int) -> int | None:
    count = count_images(data)
    return None if count is None else -(-count // batch_size)
