"""BCU — Backdoor Cleansing with Unlabeled data (Pang et al., CVPR 2023; METHODS.md §3).

The suspicious model is the teacher. The student starts as a copy of it in which, layer by layer, each
weight and bias scalar is replaced with probability ``p_l`` by the value of a freshly initialised layer;
the student is then distilled from the teacher on unlabeled images (KL on temperature-softened logits,
no labels). Benign behaviour transfers through the data; the backdoor is never exercised by clean data,
so the perturbed trigger pathway is not restored.

Layers are the parametrised modules (those owning parameters) in the order the forward pass first
calls them; normalisation layers are skipped by type and keep their parameters and running statistics.
Depth is assigned over that order, so the rule works on any architecture.

Re-initialisation rules (``reinit=``; the default ``"auto"`` takes ``"uniform"`` on in-distribution data and
``"adaptive"`` on far data, chosen leave one family out over 14 trigger families and four teachers — two small CNNs,
a flatten-head CNN and the CIFAR ResNet-18 — in issue 16; docs/cleansing.md):

* ``"authors"`` — the authors' ResNet-18 ratios by stage: stem 0.01, stages 1–4 0.01 / 0.03 / 0.09 /
  0.27 (×3 per stage: deep layers hold the backdoor), classifier 0.10. On any model the last layer is
  the classifier, the first the stem, and the others fall into four stages of equal normalised depth;
  on a ResNet-18 this reproduces the authors' assignment exactly.
* ``"adaptive"`` (far data's) — the authors' depth profile, scaled so that the perturbation *compounded
  along the least-perturbed route* through the network reaches the same level on every architecture. A
  signal reaches the output along an untouched path with probability ``∏(1 − p_l)`` over the layers it
  crosses (every scalar on the path must survive); call ``H = Σ −ln(1 − p_l)`` the path's *hazard*, so
  ``e^−H`` of such paths stay intact. On a plain chain every path crosses every layer; in a residual network
  the identity shortcuts let a signal skip most layers (a ResNet-18's least-perturbed route crosses the stem,
  three projection shortcuts and the classifier), so the rule takes the smallest ``H`` over the input →
  output routes of the traced graph (:func:`least_path_hazard`; the sum over all layers when the model cannot
  be traced). A fixed ratio table acts very differently across architectures: the authors' ratios leave more
  than half of the least-perturbed route's paths intact on a ResNet-18 and on a 4-layer CNN, where they leave
  the backdoor in place (docs/cleansing.md). The rule scales every layer's hazard by one
  factor ``k = max(1, H* / H_authors(model))`` with ``H* = −ln intact_paths``: at most 1 % of the
  least-perturbed route's paths intact on far data (``H* = ln 100``), 0.2 % on in-distribution data (``ln 500``,
  chosen leave one family out in issue 16); ``p_l = 1 − (1 − p_l^authors)^k``. Ratios stay in [0, 1) and
  monotone in depth. At 1 %: 4-layer CNN k = 10 (deepest conv 0.96); CIFAR or torchvision ResNet-18: k = 8.3 (stem and stage 1 0.08,
  stage 4 0.93, classifier 0.58); long plain chains keep the authors' ratios (k = 1). ``H*`` is a property of
  the perturbation, not of a data set (why the route and not the sum over all layers: docs/cleansing.md and
  benchmarks/RESULTS.md, BCU).
* ``"uniform"`` (in-distribution data's) — the same total hazard (sum over the layers) as ``"adaptive"``,
  spread evenly over them. On a residual network that sum is far above the least-perturbed route's, so every layer
  is perturbed strongly; the authors' depth profile leaves the early layers nearly intact, and on the ResNet-18 the
  blend-type triggers (Blended, the colour filter, reflections, adaptive blend) live there (held out: adaptive
  left ASR 0.14–0.76 on five of twelve families, uniform at most 0.019; on the small CNNs uniform costs ~1 CA point
  more). ``"none"`` — plain distillation from a copy of the
  teacher. A float — that ratio for every layer. A sequence — one ratio per layer in forward order. A callable
  ``(list[LayerRatio]) -> list[float]`` — your own rule.

Fresh values come from the architecture's own initialisation: ``init=`` (a zero-argument factory of
the architecture, e.g. ``lambda: build_model("small_cnn")``), else each layer's ``reset_parameters()``
(PyTorch's default initialisation of that layer type, which is also what trojanguard's own models use).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from trojanguard.cleanse.augment import AUGMENTATIONS, NOISE_STD, make_augment
from trojanguard.cleanse.base import (
    CleanseError,
    Cleanser,
    CleanseReport,
    UnlabeledImages,
    config_with,
    copy_of,
    model_device,
    preflight,
    setting,
)
from trojanguard.cleanse.distillation import (
    AGREEMENT_KEEP,
    EVOKED_CLASS_GAIN,
    KEEP_MAX_GRAD_NORM,
    LOSSES,
    NORM_STATS,
    VIEW_TARGETS,
    DistillSettings,
    batch_statistics_agreement,
    distill,
    dominant_class_warning,
    evoked_class_gain,
    far_data_warning,
    hooked_eval_pass,
    is_normalisation,
    normalisation_gap,
    prediction_agreement,
    unverified_note,
)
from trojanguard.cleanse.evaluation import Evaluation
from trojanguard.models.adapters import Classifier, as_classifier
from trojanguard.models.compiled import is_compiled

AUTHORS_STAGE_RATIOS = (0.01, 0.01, 0.03, 0.09, 0.27)  # stem, stage 1, 2, 3, 4 (×3 per stage) [code]
AUTHORS_CLASSIFIER_RATIO = 0.10  # [code]
AUTHORS_REFERENCE_LAYERS = 21  # conv/linear layers of the CIFAR ResNet-18 the ratios were set for
REINIT_RULES = ("adaptive", "authors", "uniform", "none")
CLASSIFIER_STAGE = len(AUTHORS_STAGE_RATIOS)  # stage index of the last layer
GAP_SAMPLE = 256  # images of the data on which the batch-statistics agreement and the normalisation gap are measured
FRESH_SEED_OFFSET = 0x5EED_BC0  # fresh values and masks use seed + offset: a model built under torch.manual_seed(s)
# must not get its own weights back as "fresh" ones


def _auto_or(text: str, convert: Callable[[str], float], valid: Callable[[float], bool], expected: str):
    """An option given as text that takes ``auto`` or a number: ``convert(text)`` when ``valid`` holds for it."""
    if text == "auto":
        return text
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise ValueError(f"expected auto or {expected}, got {text!r}")
    return value


def parse_intact_paths(text: str) -> str | float:
    """``intact_paths`` given as text (the CLI's --intact-paths): auto or a share in (0, 1)."""
    return _auto_or(text, float, lambda share: 0 < share < 1, "a share in (0, 1)")


def parse_epochs(text: str) -> str | int:
    """``epochs`` given as text (the CLI's --epochs): auto or a positive integer."""
    return _auto_or(text, int, lambda epochs: epochs >= 1, "a positive integer")


def parse_reinit(text: str) -> str | float:
    """A ``reinit`` given as text (the CLI's --reinit): auto, a rule name or one ratio in [0, 1]."""
    if text == "auto" or text in REINIT_RULES:
        return text
    try:
        ratio = float(text)
    except ValueError:
        raise ValueError(f"expected auto, {', '.join(REINIT_RULES[:-1])}, {REINIT_RULES[-1]} or a ratio in [0, 1], "
                         f"got {text!r}") from None
    if not 0 <= ratio <= 1:
        raise ValueError(f"a ratio must lie in [0, 1], got {ratio}")
    return ratio


@dataclass(frozen=True)
class BCUConfig:
    """Every BCU hyperparameter, with the defaults of the class docstring of :class:`BCU`; validated on
    construction, so a config that exists can run. ``BCU.__repr__``, the report's ``config`` and the
    ``trojanguard cleanse`` options derive from these fields."""

    reinit: object = setting("auto", "re-initialisation rule: auto (default: uniform on in-distribution data, "
                              "adaptive on far data), adaptive, authors, uniform, none, or one ratio in [0, 1]",
                              parse=parse_reinit)
    intact_paths: float | str = setting(
        "auto", "adaptive and uniform rules: the share of the least-perturbed route's paths left untouched: auto "
        "(default: 0.002 on in-distribution data, 0.01 on far data) or a share in (0, 1)", parse=parse_intact_paths)
    epochs: int | str = setting("auto", "distillation epochs: auto (default: 20 on in-distribution data, 40 on far "
                                 "data) or a positive integer", parse=parse_epochs)
    lr: float = setting(0.01, "SGD learning rate (cosine schedule)")
    batch_size: int = setting(64, "images per distillation batch (≥ 2: batch normalisation needs it)")
    temperature: tuple[float, float] = setting((1.0, 4.0), "distillation temperature τ, ramped (start, end)")
    augment: object = setting("none", "none (default: chosen leave one family out, in distribution and on far data), "
                               "crop, crop_flip (natural images only: flipping changes digits, text, signs) or noise "
                               f"(Gaussian, standard deviation {NOISE_STD:g} per pixel; the teacher answers on the source under view_target "
                               "auto, so the student learns to ignore small additive changes such as a blend)",
                               choices=AUGMENTATIONS)
    view_target: str = setting("auto", "the image the teacher answers on: auto (default: source for noise, and when the "
                                "augmentation moves more than EVOKED_CLASS_GAIN of in-distribution data into one "
                                "teacher class; else view), view (the authors': the augmented view the student sees), source (the "
                                "un-augmented image: an augmentation cannot evoke the backdoor) or consistent (the "
                                "view, dropping views whose teacher class differs from the source's)",
                                choices=("auto", *VIEW_TARGETS))
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(5e-4, "SGD weight decay")
    norm_stats: str = setting("auto", "batch-norm statistics: auto (default: keep the model's when the data is far "
                               "from its training distribution, else re-estimate), update or keep", choices=NORM_STATS)
    loss: str = setting("auto", "distillation loss: auto (default: logit MSE on far data, else KL), kl or mse",
                         choices=("auto", *LOSSES))
    max_grad_norm: float | str | None = setting("auto", "gradient-norm bound: auto (KEEP_MAX_GRAD_NORM when the "
                                                 "teacher's batch-norm statistics are kept, else none), a bound or None")
    init: Callable[[], nn.Module] | None = setting(  # noqa: RUF009 — setting returns a dataclasses.field
        None, "zero-argument factory of the architecture for fresh values (default: each layer's reset_parameters())")
    seed: int = setting(0, "seed of the re-initialisation, the data order and the augmentation")
    show_progress: bool = setting(True, "show a progress bar", report=False)

    def __post_init__(self) -> None:
        reinit, temperature, augment = self.reinit, self.temperature, self.augment
        max_grad_norm = self.max_grad_norm
        if isinstance(reinit, str) and reinit != "auto" and reinit not in REINIT_RULES:
            raise ValueError(f"reinit: expected 'auto', one of {REINIT_RULES}, a ratio, a sequence of ratios or a "
                             f"callable, got {reinit!r}")
        if isinstance(reinit, (int, float)) and not isinstance(reinit, bool) and not 0 <= reinit <= 1:
            raise ValueError(f"reinit: a ratio must lie in [0, 1], got {reinit}")
        if self.epochs != "auto" and (not isinstance(self.epochs, int) or isinstance(self.epochs, bool)
                                      or self.epochs < 1):
            raise ValueError(f"epochs: expected 'auto' or a positive integer, got {self.epochs!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr: expected a positive finite learning rate, got {self.lr}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"batch_size: expected an integer ≥ 2 (batch normalisation needs it), "
                             f"got {self.batch_size!r}")
        if len(temperature) != 2 or not all(t > 0 for t in temperature):
            raise ValueError(f"temperature: expected (start, end) with both > 0, got {temperature!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: expected a value in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected ≥ 0, got {self.weight_decay}")
        if not (augment is None or callable(augment) or augment in AUGMENTATIONS):
            raise ValueError(f"augment: expected one of {AUGMENTATIONS} or a callable x -> x, got {augment!r}")
        intact = self.intact_paths
        if intact != "auto" and not (isinstance(intact, (int, float)) and not isinstance(intact, bool) and 0 < intact < 1):
            raise ValueError(f"intact_paths: expected 'auto' or a share in (0, 1), got {intact!r}")
        if self.view_target != "auto" and self.view_target not in VIEW_TARGETS:
            raise ValueError(f"view_target: expected 'auto' or one of {VIEW_TARGETS}, got {self.view_target!r}")
        if self.norm_stats not in NORM_STATS:
            raise ValueError(f"norm_stats: expected one of {NORM_STATS}, got {self.norm_stats!r}")
        if self.loss != "auto" and self.loss not in LOSSES:
            raise ValueError(f"loss: expected 'auto' or one of {tuple(LOSSES)}, got {self.loss!r}")
        if max_grad_norm not in (None, "auto") and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm: expected a positive gradient-norm bound, 'auto' or None, "
                             f"got {max_grad_norm!r}")
        if self.init is not None and not callable(self.init):
            raise ValueError(f"init: expected a zero-argument callable building the architecture, got {self.init!r}")
        object.__setattr__(self, "temperature", (float(temperature[0]), float(temperature[1])))


@dataclass
class LayerRatio:
    """One parametrised layer: its name, type, place in the forward order (``depth`` in [0, 1]), the
    authors' stage (0 stem … 4, 5 classifier), its re-initialisation ratio and its own parameter count."""

    name: str
    type: str
    index: int
    depth: float
    stage: int
    ratio: float
    params: int
    reinitialised: int = 0


# ---------------------------------------------------------------------------------------------------------
# layers and ratios


@torch.no_grad()
def parametrised_layers(model: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The modules owning parameters (normalisation excluded), in the order ``model(example)`` first calls
    them; and the names of such modules the forward pass never calls (they are left as they are).

    A module whose parent uses its weights without calling it (``nn.MultiheadAttention``'s ``out_proj``) counts
    as called right after that parent; one whose nearest called ancestor is the model itself is unused."""
    owners = {name: m for name, m in model.named_modules()
              if not is_normalisation(m) and next(m.parameters(recurse=False), None) is not None}
    first_call: dict[str, int] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_module, _args) -> None:  # must return None: a pre-hook's return value replaces the inputs
            first_call.setdefault(name, len(first_call))
        return hook

    hooked_eval_pass(model, example, [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()])
    keys: dict[str, tuple[int, int]] = {}
    for name in owners:
        if name in first_call:
            keys[name] = (first_call[name], 0)
            continue
        parent = name.rpartition(".")[0]
        while parent and parent not in first_call:
            parent = parent.rpartition(".")[0]
        if parent:  # used functionally by a called module other than the root
            keys[name] = (first_call[parent], 1)
    order = sorted(keys, key=keys.__getitem__)
    unused = [n for n in owners if n not in keys]
    return [(n, owners[n]) for n in order], unused


def authors_stage(index: int, count: int) -> int:
    """The authors' stage of layer ``index`` of ``count``: last = classifier, first = stem, the others in four
    equal slices of normalised depth (exact for ResNet-18's 1 + 4 + 5 + 5 + 5 + 1 layers)."""
    if index == count - 1:
        return CLASSIFIER_STAGE
    if index == 0:
        return 0
    body = count - 1  # stem + stages
    depth = index / (body - 1)
    return max(1, math.ceil((len(AUTHORS_STAGE_RATIOS) - 1) * depth - 1e-9))


def authors_ratio(stage: int) -> float:
    return AUTHORS_CLASSIFIER_RATIO if stage == CLASSIFIER_STAGE else AUTHORS_STAGE_RATIOS[stage]


def hazard(ratios: Sequence[float]) -> float:
    """Σ −ln(1 − p): the compounded perturbation along a path through every layer (∏(1 − p) = e^−H intact)."""
    return float(sum(-math.log1p(-min(p, 1 - 1e-12)) for p in ratios))


def authors_ratios(count: int) -> list[float]:
    return [authors_ratio(authors_stage(i, count)) for i in range(count)]


REFERENCE_HAZARD = hazard(authors_ratios(AUTHORS_REFERENCE_LAYERS))  # ≈ 2.35: summed over a ResNet-18's 21 layers
# (its least-perturbed route through the shortcuts: ≈ 0.56)
TARGET_INTACT_PATHS = 0.01  # adaptive rule: at most 1 % of the least-perturbed route's paths left untouched (far data)
TARGET_HAZARD = -math.log(TARGET_INTACT_PATHS)  # ≈ 4.61
# in-distribution data: 0.2 % (≈ 6.2), chosen leave one family out over 14 trigger families and three teachers
# (issue 16, benchmarks/bcu_families.py): with augmentation off it met the bar on every held-out family
NEAR_INTACT_PATHS = 0.002
# epochs="auto": 20 in distribution (METHODS.md §3's CPU scale); far data carries less of the teacher's clean behaviour
# per image, and 40 epochs without augmentation were chosen leave one family out (issue 16, --data ood)
NEAR_EPOCHS, FAR_EPOCHS = 20, 40
# reinit="auto": the rule, chosen leave one family out over 14 families and four teachers, the CIFAR ResNet-18 among
# them (issue 16, eleventh session): in distribution "uniform" (held out 50 of 52 cells; "adaptive" 47 — it left
# blend-type triggers in the ResNet-18's early layers); far data keeps "adaptive" (FAR_REINIT, see docs/cleansing.md)
NEAR_REINIT, FAR_REINIT = "uniform", "adaptive"
# a plan that re-initialises more of the weights leaves the student close to a fresh model (uniform on a ViT-B/16: 99.9 %)
NEAR_COMPLETE_REINIT = 0.95


def reinit_warning(fraction: float, images: int) -> str | None:
    """The report's warning when the plan re-initialised nearly every weight: BCU then no longer keeps the teacher's
    benign weights and the student must learn the task from the unlabeled images alone."""
    if fraction < NEAR_COMPLETE_REINIT:
        return None
    return (f"the re-initialisation replaced {100 * fraction:.1f} % of the weights: the student is close to a fresh "
            f"model that must learn the task from {images} unlabeled images; check its clean accuracy, or pass "
            "reinit='authors' or your own ratios (deep residual networks and transformers get very strong plans)")


def least_path_hazard(model: nn.Module, hazards: dict[str, float]) -> float | None:
    """The smallest total hazard along any input → output path of ``model``'s traced graph (``torch.fx``), where
    calling module ``name`` costs ``hazards[name]`` and every other operation (add, ReLU, pooling …) costs 0. On a
    plain chain it is the sum over all layers; a residual network's identity shortcuts give routes that cross far
    fewer re-initialised layers. None when the model cannot be traced or a path crosses no hazard at all. A custom
    layer that uses its own parameters functionally is inlined by the tracer and costs 0 here, which can only make
    the route look weaker and the adaptive rule stronger."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 — data-dependent control flow etc.: the caller falls back to the chain
        return None
    cost: dict[torch.fx.Node, float] = {}
    result = None
    for node in graph.nodes:  # topological order
        if node.op == "placeholder":
            cost[node] = 0.0
            continue
        reached = [cost[a] for a in node.all_input_nodes if a in cost]
        if not reached:
            continue  # constants and parameters: not on a path from the input
        cost[node] = min(reached) + (hazards.get(str(node.target), 0.0) if node.op == "call_module" else 0.0)
        if node.op == "output":
            result = cost[node]
    return result if result is not None and result > 0 else None


def adaptive_scale(layers: list[LayerRatio], model: nn.Module | None = None,
                   target_hazard: float = TARGET_HAZARD) -> float:
    """k = max(1, H* / H_authors): how much the authors' per-layer hazards are scaled, where H_authors is the
    least total hazard of the authors' ratios along any input → output path of ``model`` (the sum over the layers
    when the model is not given or cannot be traced) and H* = ``target_hazard`` (default: 1 % of paths intact)."""
    base = authors_ratios(len(layers))
    reference = None
    if model is not None:
        reference = least_path_hazard(model, {layer.name: hazard([p]) for layer, p in zip(layers, base, strict=True)})
    return max(1.0, target_hazard / (reference if reference is not None else hazard(base)))


def rule_ratios(rule, layers: list[LayerRatio], scale: float | None = None) -> list[float]:
    """Per-layer ratios of ``rule`` (see the module docstring) for ``layers`` in forward order; ``scale``: the
    adaptive factor k (default: from the layer count alone, as for a plain chain)."""
    n = len(layers)
    if isinstance(rule, str):
        if rule == "none":
            return [0.0] * n
        base = authors_ratios(n)
        if rule == "authors":
            return base
        k = scale if scale is not None else adaptive_scale(layers)
        if rule == "adaptive":
            return [1 - (1 - p) ** k for p in base]
        if rule == "uniform":
            return [1 - math.exp(-k * hazard(base) / n)] * n
        raise ValueError(f"reinit: expected one of {REINIT_RULES}, a ratio, a sequence of ratios or a callable, got {rule!r}")
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        ratios = [float(rule)] * n
    elif callable(rule):
        ratios = [float(p) for p in rule(layers)]
    elif isinstance(rule, Sequence):
        ratios = [float(p) for p in rule]
    else:
        raise TypeError(f"reinit: expected one of {REINIT_RULES}, a ratio, a sequence of ratios or a callable, got {rule!r}")
    if len(ratios) != n:
        raise ValueError(f"reinit: expected {n} ratios (one per parametrised layer), got {len(ratios)}")
    bad = [p for p in ratios if not 0 <= p <= 1]
    if bad:
        raise ValueError(f"reinit: ratios must lie in [0, 1], got {bad[0]}")
    return ratios


def layer_ratios(model: nn.Module, example: torch.Tensor, rule="adaptive", intact_paths: float = TARGET_INTACT_PATHS
                 ) -> tuple[list[LayerRatio], list[str]]:
    """The re-initialisation plan of ``rule`` for ``model``: one :class:`LayerRatio` per parametrised layer in
    forward order, and the parametrised modules the forward pass never calls (left untouched).
    ``example: (N, C, H, W)`` is a small batch the model accepts; ``intact_paths``: the adaptive / uniform rules'
    share of the least-perturbed route's paths left untouched (``H* = −ln intact_paths``)."""
    found, unused = parametrised_layers(model, example)
    if not found:
        raise CleanseError("model: it has no parametrised layer (convolution, linear, …) to re-initialise")
    n = len(found)
    layers = [LayerRatio(name or "<root>", type(m).__name__, i, i / (n - 1) if n > 1 else 1.0,
                         authors_stage(i, n), 0.0, sum(p.numel() for p in m.parameters(recurse=False)))
              for i, (name, m) in enumerate(found)]
    scale = (adaptive_scale(layers, model, -math.log(intact_paths))
             if isinstance(rule, str) and rule in ("adaptive", "uniform") else None)
    for layer, p in zip(layers, rule_ratios(rule, layers, scale), strict=True):
        layer.ratio = p
    return layers, unused


# ---------------------------------------------------------------------------------------------------------
# re-initialisation


def _fresh_layer(name: str, module: nn.Module, fresh_model: nn.Module | None) -> nn.Module | None:
    if fresh_model is not None:
        return dict(fresh_model.named_modules()).get("" if name == "<root>" else name)
    reset = "reset_parameters" if hasattr(module, "reset_parameters") else "_reset_parameters"  # MultiheadAttention
    if not hasattr(module, reset):
        return None
    fresh = copy.deepcopy(module)
    getattr(fresh, reset)()
    return fresh


@torch.no_grad()
def reinitialize(student: nn.Module, layers: list[LayerRatio], *, seed: int,
                 init: Callable[[], nn.Module] | None = None) -> list[str]:
    """Replace each scalar of every layer's own weights and biases, with probability ``layer.ratio``, by the
    value of a freshly initialised layer (no rescaling). In place on ``student``; deterministic for
    ``seed``; returns the names of layers that had no fresh values (no ``reset_parameters`` and no ``init``).
    """
    modules = dict(student.named_modules())
    skipped: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FRESH_SEED_OFFSET + seed)  # never the seed a model was itself built with
        fresh_model = init() if init is not None else None
        mask_gen = torch.Generator().manual_seed(FRESH_SEED_OFFSET + seed + 1)
        for layer in layers:
            module = modules["" if layer.name == "<root>" else layer.name]
            if layer.ratio <= 0:
                continue
            fresh = _fresh_layer(layer.name, module, fresh_model)
            if fresh is None:
                skipped.append(layer.name)
                continue
            fresh_params = dict(fresh.named_parameters(recurse=False))
            count = 0
            for pname, param in module.named_parameters(recurse=False):
                new = fresh_params.get(pname)
                if new is None or new.shape != param.shape:
                    raise CleanseError(f"init: the fresh model's {layer.name}.{pname} has shape "
                                       f"{None if new is None else tuple(new.shape)}, the model's {tuple(param.shape)}; "
                                       "init must build the same architecture")
                mask = (torch.rand(param.shape, generator=mask_gen) < layer.ratio).to(param.device)
                param.copy_(torch.where(mask, new.to(device=param.device, dtype=param.dtype), param))
                count += int(mask.sum())
            layer.reinitialised = count
    return skipped


# ---------------------------------------------------------------------------------------------------------
# the cleanser


class BCU(Cleanser):
    """Backdoor Cleansing with Unlabeled data: re-initialise a depth-dependent share of the weights, then distil.

    ``cleanse(model, data)`` returns a new model (the caller's is left untouched) trained on unlabeled
    images ``data`` (tensor ``(N, C, H, W)`` in [0, 1], ImageDataset, Dataset or DataLoader; labels ignored);
    ``report`` holds the per-layer ratios and the per-epoch distillation loss (and CA / ASR per epoch with
    ``evaluation=Evaluation(x, y, trigger, target)``).

    Defaults: the authors' SGD (momentum 0.9, wd 5e-4, cosine), τ ramped 1 → 4, scaled to a CPU (METHODS.md §3:
    10–20 epochs, 500–2000 images, batch 64–128). Before training BCU checks whether the data lies near the
    model's training distribution (:func:`~trojanguard.cleanse.distillation.batch_statistics_agreement`: the share of
    the data's predicted classes that stay the same when batch norm uses the data's own batch statistics instead
    of its running statistics). Near (≥ ``AGREEMENT_KEEP``): the authors' recipe — KL on softened outputs,
    student in train mode so batch norm re-estimates its statistics on the data. Far (out-of-distribution data):
    batch norm keeps the teacher's
    statistics (data that far away would overwrite them and wreck clean accuracy, even with no
    re-initialisation at all), gradients are clipped (``KEEP_MAX_GRAD_NORM``) and the loss
    matches logits (MSE) instead of
    softened outputs. ``norm_stats``, ``loss`` and ``max_grad_norm`` override each choice ("auto" by default).
    Augmentation, the re-initialisation rule, intact paths and epochs were chosen leave one family out (issue 16,
    ``benchmarks/bcu_families.py``): no augmentation in either domain; in distribution the uniform rule, 0.2 % of
    intact paths and 20 epochs (over 14 trigger families and four teachers, the CIFAR ResNet-18 among them, the
    held-out bar, ASR ≤ 5 % at a CA drop ≤ 3 points, was met on 50 of 52 held-out cells; the adaptive rule on 47, the
    authors' crop with 1 % on 34 in sample); on far data the adaptive rule, 1 % and 40 epochs (10 of 20 held-out cells, the
    previous crop with 20 epochs 9; far data leaves several families' backdoors in place whatever the setting). Without
    augmentation the teacher answers each image once (:class:`~trojanguard.cleanse.distillation.AnsweredImages`).
    The authors' horizontal flip is for domains that allow it (``augment="crop_flip"``); it changes the meaning of
    digits, text and traffic signs, and on the digits zoo it left more of WaNet's backdoor than crop only did
    (docs/cleansing.md).
    ``view_target`` says whether the teacher answers on the augmented view (the authors'), on the un-augmented
    source image, or on the view with views that change its answer left out: an
    augmentation can make clean images look like a trigger to the teacher (issue 16: a zero-padded crop sends
    17–29 % of clean digits to the target of WaNet / random-patch models trained without random shifts, and BCU then
    kept WaNet's backdoor, ASR 0.63–0.83 over three seeds, which ``"source"`` removed; benchmarks/RESULTS.md).
    ``"auto"`` (default) measures that before training, without labels (:func:`evoked_class_gain` on the probe
    sample: the largest share of images the augmentation moves into one teacher class) and, on in-distribution data,
    answers on the source when it exceeds ``EVOKED_CLASS_GAIN``, else on the view (out of distribution always the
    view: photo crops move under any crop, and the source cost clean accuracy there) — answering on the source costs
    where nothing is evoked (filter, SIG: higher ASR on one of three seeds). With ``augment="noise"`` it is always the
    source, so the student learns the teacher's clean answer under small additive changes. The report gives ``view_class_gain``, the ``view_target``
    used, and ``view_prediction_change`` (share of first-epoch views whose teacher class differs from the source's).
    """

    model_kind = Classifier  # BCU distils logits

    def __init__(self, *, config: BCUConfig | None = None, **settings):
        """``BCU(epochs=5, ...)`` or ``BCU(config=BCUConfig(...))`` (keywords given with a config override its
        fields); every setting is a :class:`BCUConfig` field, validated there."""
        self.config = config_with(BCUConfig, config, settings, owner="BCU")
        self.report: CleanseReport | None = None

    def plan(self, model: nn.Module, example: torch.Tensor, *, far: bool = False) -> list[LayerRatio]:
        """The per-layer ratios this cleanser would use on ``model`` (``example``: a batch it accepts) with
        in-distribution data (``far=True``: with far data; they differ only where ``reinit`` or ``intact_paths`` is
        ``"auto"``)."""
        teacher = copy.deepcopy(model)
        return layer_ratios(teacher, example.to(model_device(teacher)), self._reinit(far), self._intact_paths(far))[0]

    def _reinit(self, far: bool):
        chosen = self.config.reinit
        return chosen if not (isinstance(chosen, str) and chosen == "auto") else (FAR_REINIT if far else NEAR_REINIT)

    def _epochs(self, far: bool) -> int:
        chosen = self.config.epochs
        return int(chosen) if chosen != "auto" else (FAR_EPOCHS if far else NEAR_EPOCHS)

    def _intact_paths(self, far: bool) -> float:
        chosen = self.config.intact_paths
        return float(chosen) if chosen != "auto" else (TARGET_INTACT_PATHS if far else NEAR_INTACT_PATHS)

    def cleanse(self, model: nn.Module, data, *, evaluation: Evaluation | None = None) -> nn.Module:
        """Return a cleansed copy of ``model``; see the class docstring. Raises instead of returning a model
        that did not train (data that does not fit the model, too few images, NaN losses)."""
        model = as_classifier(model).module
        if is_compiled(model):
            raise CleanseError("model: expected a trainable model, got a compiled TorchScript / torch.export program "
                               "(its weights cannot be re-initialised or trained); BCU needs the weights as a state "
                               "dict (safetensors / .pt) and the architecture (CLI: --arch)")
        start, cpu_start = time.perf_counter(), time.process_time()
        config = self.config
        self.report = None
        device = model_device(model)
        images = UnlabeledImages(data, config.batch_size, config.seed)
        teacher = copy_of(model, "BCU needs a frozen teacher copy")
        teacher.eval().requires_grad_(False)
        sample = images.sample()
        preflight(teacher, sample, device)
        probe = images.sample(GAP_SAMPLE).to(device)
        agreement = batch_statistics_agreement(teacher, probe)
        gap = normalisation_gap(teacher, probe)  # reported: how far, not the switch
        far = agreement is not None and agreement < AGREEMENT_KEEP
        intact_paths = self._intact_paths(far)
        reinit = self._reinit(far)
        layers, unused = layer_ratios(teacher, sample.to(device), reinit, intact_paths)
        norm_stats = config.norm_stats if config.norm_stats != "auto" else ("keep" if far else "update")
        loss = config.loss if config.loss != "auto" else ("mse" if far else "kl")
        augment = make_augment(config.augment)
        gain = None if augment is None else evoked_class_gain(teacher, probe, augment, config.seed)
        view_target = config.view_target
        if view_target == "auto":
            # noise: the point is invariance to it, and the teacher's answer on a noisy view is not its clean answer
            # (far data, Blended model: noise of 0.1 changed its class on 99.9 % of the crops outside its target and on
            # none of its target crops) — always the source.
            # Far data and crops: the teacher's classes of photo crops move under any crop (measured gain 0.07-0.14 on
            # the zoo) and answering on the source cost 1.4-8 CA points there without a gain in ASR: the view
            evoked = not far and gain is not None and gain > EVOKED_CLASS_GAIN
            view_target = "source" if config.augment == "noise" or evoked else "view"
        max_grad_norm = config.max_grad_norm
        if max_grad_norm == "auto":
            max_grad_norm = KEEP_MAX_GRAD_NORM if norm_stats == "keep" else None
        student = copy.deepcopy(teacher)
        skipped = reinitialize(student, layers, seed=config.seed, init=config.init)
        report = CleanseReport("BCU", self.report_config())
        if evaluation is not None:
            report.before = evaluation(teacher)
        epochs = self._epochs(far)
        settings = DistillSettings(epochs, config.lr, config.momentum, config.weight_decay, config.temperature,
                                   norm_stats, max_grad_norm, loss)
        fork = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(config.seed)
            rows, seen, shares, view_change = distill(
                student, teacher, images, settings, device=device, seed=config.seed,
                augment=augment, view_target=view_target, evaluation=evaluation,
                show_progress=config.show_progress, desc="BCU")
        student.eval()
        with torch.no_grad():
            agreement_after = prediction_agreement(student, teacher, probe)
        total = sum(layer.params for layer in layers)
        report.images, report.epochs = seen, rows
        report.details = {
            "rule": reinit if isinstance(reinit, str) else "custom",
            "batch_stat_agreement": agreement, "normalisation_gap": gap,
            "domain": "unknown" if agreement is None else ("out-of-distribution" if far else "in-distribution"),
            "norm_stats": norm_stats, "loss": loss, "max_grad_norm": max_grad_norm,
            "adaptive_scale": adaptive_scale(layers, teacher, -math.log(intact_paths)),
            "intact_paths": intact_paths, "epochs": epochs,
            "augment": config.augment if isinstance(config.augment, str) or config.augment is None else "custom",
            "least_path_hazard": least_path_hazard(teacher, {layer.name: hazard([layer.ratio]) for layer in layers}),
            "reference_hazard": REFERENCE_HAZARD,
            "hazard": hazard([layer.ratio for layer in layers]),
            "reinitialised_fraction": sum(layer.reinitialised for layer in layers) / max(1, total),
            "init": "factory" if config.init is not None else "reset_parameters",
            "layers": [asdict(layer) for layer in layers],
            "unused_layers": unused,
            "layers_without_initialiser": skipped,
            "teacher_class_share": [round(x, 4) for x in shares],
            "view_prediction_change": view_change,
            "view_class_gain": gain,
            "view_target": view_target,
            "teacher_student_agreement": agreement_after,
        }
        forced = config.norm_stats != "auto" or config.loss != "auto"
        found = [w for w in (far_data_warning(agreement, forced), dominant_class_warning(shares),
                             reinit_warning(report.details["reinitialised_fraction"], seen)) if w is not None]
        report.details["warnings"] = found
        for warning in found:
            warnings.warn(warning, stacklevel=2)
        if evaluation is None:
            report.details["notes"] = [unverified_note(agreement_after, max(shares, default=0.0))]
        else:
            report.after = rows[-1].metrics if rows and rows[-1].metrics else evaluation(student)
        report.seconds = time.perf_counter() - start
        report.details["cpu_seconds"] = time.process_time() - cpu_start  # all threads; ≈ seconds × cores when idle
        self.report = report
        return student
