"""MIMIC (Han et al., 2024): cleanse a backdoored self-supervised encoder with a little unlabeled clean data.

The backdoored encoder is the *teacher*; a student of the same architecture starts from **random weights** (it
inherits nothing of the backdoor) and learns from three terms (METHODS.md §4):

* NT-Xent on the student's projections of two SimCLR views (temperature 0.5), so it learns features of its own;
* attention transfer at every stage ``l``: the MSE between student and teacher attention maps
  ``A(F) = Σ_c F_c²`` (flattened, L2-normalised), weighted by ``λ_l = 1000 + 10000 · MI_l / Σ MI``;
* clone: the negative cosine between the student's and the teacher's features.

``MI_l`` is the mutual information between stage ``l``'s (globally pooled) map and the encoder's normalised
features, estimated by MINE (the Donsker–Varadhan bound; statistics MLP ``[pooled F_l, z] → 512 → 512 → 1``,
marginal by in-batch shuffling, Adam 1e-3, the mean of the last 10 epochs' estimates, negatives clipped to 0).
Where it is estimated is ``mi_source``: the authors' code estimates it once on the randomly initialised student
before distillation, their abstract says the teacher (docs/mimic.md says which is the default and why).

**Stages** (ours, no name matching): the last module to complete at each spatial size of the forward pass
(ResNet-18: ``layer1`` … ``layer4``; the small CNN: each conv block's activation and the final map), or the
module names given. **Student** (ours: "any architecture"): a copy of the teacher whose every module with a
``reset_parameters`` (normalisation layers included) is reset, seeded.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trojanguard.cleanse._training import StepResult, train
from trojanguard.cleanse.base import (
    Cleanser,
    CleanseReport,
    UnlabeledImages,
    config_with,
    copy_of,
    model_device,
    setting,
)
from trojanguard.errors import DataError
from trojanguard.models.adapters import Encoder, as_encoder
from trojanguard.models.features import POOLING_TYPES, global_average, module_by_name

MI_SOURCES = ("student", "teacher")
MIN_IMAGES = 16  # MIMIC is meant for a few percent of the pre-training set; fewer than this cannot form batches
RECOMMENDED_IMAGES = 64
MI_TAIL = 10  # MI_l = mean of the last MI_TAIL epochs' estimates (the authors')


def parse_stages(text: str):
    """--stages: ``auto`` or comma-separated module names."""
    return "auto" if text == "auto" else tuple(name.strip() for name in text.split(",") if name.strip())


@dataclass(frozen=True)
class MIMICConfig:
    """Every MIMIC hyperparameter (METHODS.md §4; what is scaled down for a CPU: docs/mimic.md); validated on
    construction. ``MIMIC.__repr__``, the report's ``config`` and the ``trojanguard cleanse`` options derive from
    these fields."""

    epochs: int = setting(100, "distillation epochs over the clean images (the authors: 1000 on 2000 images)")
    lr: float = setting(1e-3, "Adam learning rate (cosine schedule)")
    weight_decay: float = setting(1e-6, "Adam weight decay")
    batch_size: int = setting(128, "images per batch (each gives two SimCLR views)")
    temperature: float = setting(0.5, "NT-Xent temperature")
    mi_source: str = setting("student", "where the per-stage mutual information is estimated: student (the "
                             "randomly initialised one, the authors' code) or teacher", choices=MI_SOURCES)
    mi_epochs: int = setting(200, "MINE training epochs per stage")
    mi_hidden: int = setting(512, "width of MINE's statistics network")
    base_weight: float = setting(1000.0, "λ_l = base_weight + mi_weight · MI_l / Σ MI")
    mi_weight: float = setting(10000.0, "λ_l = base_weight + mi_weight · MI_l / Σ MI (0: uniform weights)")
    clone_weight: float = setting(1.0, "weight of the clone term (negative cosine to the teacher's features)")
    stages: object = setting("auto", "the stages whose attention is transferred: auto (the last module at each "
                             "spatial size) or comma-separated module names", parse=parse_stages)
    augmentation: object = setting(None, "a SimCLRAugmentation (None: SimCLR's at the data's image size)",
                                   report=False)
    evaluate_every: int = setting(1, "epochs between evaluations when an evaluation is passed (a linear probe is "
                                  "refitted each time: 10 saves most of its cost)")
    seed: int = setting(0, "seed of the student's initialisation, views and batches")
    show_progress: bool = setting(True, "progress lines", report=False)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "mi_epochs", "mi_hidden", "evaluate_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size: expected at least 2 (NT-Xent needs a negative), got {self.batch_size}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: expected a positive finite number, got {getattr(self, name)}")
        for name in ("weight_decay", "base_weight", "mi_weight", "clone_weight"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: expected a finite number ≥ 0, got {getattr(self, name)}")
        if self.mi_source not in MI_SOURCES:
            raise ValueError(f"mi_source: expected one of {MI_SOURCES}, got {self.mi_source!r}")
        if self.stages != "auto" and not (isinstance(self.stages, (tuple, list)) and self.stages
                                          and all(isinstance(s, str) for s in self.stages)):
            raise ValueError(f"stages: expected 'auto' or a non-empty sequence of module names, got {self.stages!r}")


class MIMIC(Cleanser):
    """Mutual-information-guided distillation of a backdoored encoder into a random student (module docstring).

    ``MIMIC(epochs=50, ...)`` or ``MIMIC(config=MIMICConfig(...))``. ``cleanse(encoder, images)`` returns a new
    encoder with the input and output of the one handed in (an :class:`~trojanguard.models.Encoder` for an
    Encoder, else a module of the same class), which stays untouched; ``report`` holds the stages, their MI and
    λ, and per-epoch losses (``nt_xent``, ``attention``, ``clone``), with probe CA / ASR when an evaluation
    (e.g. :class:`~trojanguard.cleanse.LinearProbeEvaluation`) is passed.
    """

    model_kind = Encoder

    def __init__(self, *, config: MIMICConfig | None = None, **settings):
        self.config = config_with(MIMICConfig, config, settings, owner="MIMIC")

    def cleanse(self, model: nn.Module, data, *,
                evaluation: Callable[[nn.Module], dict[str, float]] | None = None) -> nn.Module:
        from trojanguard.ssl.augment import SimCLRAugmentation
        from trojanguard.ssl.simclr import ProjectionHead, SimCLRModel, nt_xent

        start = time.perf_counter()
        config = self.config
        self.report = None
        encoder = as_encoder(model)
        device = model_device(encoder)
        images = UnlabeledImages(data, config.batch_size, config.seed, minimum=MIN_IMAGES,
                                 recommended=RECOMMENDED_IMAGES)
        teacher = copy_of(encoder, "MIMIC needs a frozen teacher copy").eval().requires_grad_(False)
        sample = images.sample().to(device)
        dim = teacher.check(sample, argument="model", needed_by="MIMIC")
        stages = resolve_stages(teacher.module, teacher, sample, config.stages)
        student = random_student(teacher, config.seed).to(device)
        kept = kept_parameters(student)
        if kept:
            warnings.warn(f"model: {len(kept)} parameter(s) have no reset_parameters and start from the suspicious "
                          f"weights ({', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''})", stacklevel=2)
        report = CleanseReport("MIMIC", self.report_config())
        if evaluation is not None:
            report.before = evaluation(teacher)

        mi_model = student if config.mi_source == "student" else teacher
        clean_x = images.sample(images.count or RECOMMENDED_IMAGES * 16).to(device)
        rng_devices = [device.index or 0] if device.type == "cuda" else []  # the generators fork_rng restores
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(config.seed)
            information = [mine_estimate(mi_model, mi_model.module, name, clean_x, epochs=config.mi_epochs,
                                         hidden=config.mi_hidden, batch_size=config.batch_size, seed=config.seed)
                           for name in stages]
        weights = stage_weights(information, config.base_weight, config.mi_weight)

        augment = config.augmentation or SimCLRAugmentation(image_size=int(sample.shape[-1]))
        model_s = SimCLRModel(student, ProjectionHead(dim)).to(device)
        teacher_maps, student_maps = StageCapture(teacher.module, stages), StageCapture(student.module, stages)
        optimizer = torch.optim.Adam(model_s.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
        generator = torch.Generator().manual_seed(config.seed)

        def step(batch: torch.Tensor, epoch: int, index: int) -> StepResult:
            n = len(batch)
            views = torch.cat([augment(batch, generator), augment(batch, generator)])
            features = model_s(views)
            nt = nt_xent(model_s.head(features[:n]), model_s.head(features[n:]), config.temperature)
            with torch.no_grad():
                target = teacher(views)
            attention = sum(w * attention_loss(student_maps.outputs[s], teacher_maps.outputs[s])
                            for s, w in zip(stages, weights, strict=True))
            clone = -F.cosine_similarity(features, target, dim=1).mean()
            loss = nt + attention + config.clone_weight * clone
            return StepResult(loss, terms={"nt_xent": nt, "attention": attention, "clone": clone})

        every = _Every(evaluation, config.evaluate_every, config.epochs) if evaluation is not None else None
        model_s.train()
        try:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(config.seed)
                trained = train(model_s, step, images, optimizer=optimizer, scheduler=scheduler,
                                epochs=config.epochs, device=device, evaluation=every, loss_name="MIMIC loss",
                                show_progress=config.show_progress, desc="MIMIC")
        finally:
            teacher_maps.remove()
            student_maps.remove()
        student.eval()
        report.images, report.epochs = trained.images, trained.rows
        report.details = {"stages": list(stages), "mutual_information": information, "weights": weights,
                          "mi_source": config.mi_source, "kept_parameters": kept}
        if evaluation is not None:
            report.after = evaluation(student)
        report.seconds = time.perf_counter() - start
        self.report = report
        return student if isinstance(model, Encoder) else student.module


class _Every:
    """An evaluation run every ``every`` epochs and after the last (the loop calls it after each epoch)."""

    def __init__(self, evaluation, every: int, epochs: int):
        self.evaluation, self.every, self.epochs, self.calls = evaluation, every, epochs, 0

    def __call__(self, model: nn.Module) -> dict[str, float]:
        self.calls += 1
        if self.calls % self.every == 0 or self.calls == self.epochs:
            return self.evaluation(model)
        return {}


# ---------------------------------------------------------------------------------------------------------
# stages and their attention


@torch.no_grad()
def auto_stages(module: nn.Module, run: Callable[[torch.Tensor], object], example: torch.Tensor) -> list[str]:
    """The last module (in the order forward passes complete) with a 4-D output at each spatial size, pooling
    layers left out: the stages of a network, shallow to deep, found without knowing its names."""
    order: list[tuple[str, tuple[int, int]]] = []
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: order.append((n, tuple(out.shape[2:])))
                                       if isinstance(out, torch.Tensor) and out.dim() == 4
                                       and not isinstance(mod, POOLING_TYPES) else None)
               for n, m in module.named_modules() if n]
    try:
        run(example)
    finally:
        for handle in handles:
            handle.remove()
    last: dict[tuple[int, int], str] = {}
    for name, size in order:
        last.pop(size, None)  # re-inserted: the dict's order is the order each size was last completed
        last[size] = name
    if not last:
        raise DataError("model: MIMIC transfers attention maps, but no module of the encoder returns a 4-D "
                        "(N, C, H, W) map; pass stages=<module names>")
    return list(last.values())


def resolve_stages(module: nn.Module, encoder: nn.Module, example: torch.Tensor, stages) -> list[str]:
    """``stages`` as module names of ``module`` (``"auto"``: :func:`auto_stages`), each checked to exist and to
    return a 4-D map on ``example``."""
    names = auto_stages(module, encoder, example) if stages == "auto" else list(stages)
    for name in names:
        try:
            module_by_name(module, name)
        except ValueError as exc:
            raise DataError(f"stages: {exc}".replace("layer: ", "")) from None
    capture = StageCapture(module, names)
    try:
        with torch.no_grad():
            encoder(example)
    finally:
        capture.remove()
    for name in names:
        out = capture.outputs.get(name)
        if out is None or out.dim() != 4:
            got = "no output" if out is None else f"shape {tuple(out.shape)}"
            raise DataError(f"stages: expected modules with a 4-D (N, C, H, W) output, got {name!r} with {got}")
    return names


class StageCapture:
    """Forward hooks, registered once, that keep the latest output of each named stage of ``module``
    (``outputs[name]``); :meth:`remove` takes them off."""

    def __init__(self, module: nn.Module, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [module_by_name(module, name).register_forward_hook(self._keeper(name)) for name in names]

    def _keeper(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name] = output
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N, H·W)``: ``Σ_c F_c²``, L2-normalised per image (Zagoruyko & Komodakis' attention)."""
    return F.normalize(feature.pow(2).sum(1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The MSE between the student's and the (detached) teacher's attention maps of one stage."""
    return F.mse_loss(attention_map(student), attention_map(teacher).detach())


# ---------------------------------------------------------------------------------------------------------
# the student and the MI weights


def random_student(teacher: nn.Module, seed: int) -> nn.Module:
    """A trainable copy of ``teacher`` with every module that has ``reset_parameters`` reset (normalisation
    layers' affine weights and running statistics included), seeded; nothing of the teacher's weights is left
    in a module that can reset itself (:func:`kept_parameters` names what could not be reset)."""
    student = copy.deepcopy(teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in student.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return student.requires_grad_(True).train()


def kept_parameters(model: nn.Module) -> list[str]:
    """The parameters :func:`random_student` cannot re-initialise: those a module owns directly without a
    ``reset_parameters`` (a ViT's class token or position embedding); the student starts with the teacher's."""
    return [f"{name}.{p}" if name else p for name, module in model.named_modules()
            if not callable(getattr(module, "reset_parameters", None))
            for p, _ in module.named_parameters(recurse=False)]


class MINEStatistics(nn.Sequential):
    """MINE's statistics network ``T([pooled stage features, z]) -> score``."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


def donsker_varadhan(statistics: nn.Module, stage: torch.Tensor, z: torch.Tensor, permutation: torch.Tensor
                     ) -> torch.Tensor:
    """The Donsker–Varadhan lower bound of I(stage; z) on one batch: ``E_joint[T] − log E_marginal[e^T]``, the
    marginal pairs each stage feature with another image's ``z`` (``permutation``)."""
    joint = statistics(torch.cat([stage, z], dim=1)).squeeze(1)
    marginal = statistics(torch.cat([stage, z[permutation]], dim=1)).squeeze(1)
    return joint.mean() - (torch.logsumexp(marginal, 0) - math.log(len(marginal)))


def mine_estimate(encoder: nn.Module, module: nn.Module, stage: str, x: torch.Tensor, *, epochs: int, hidden: int,
                  batch_size: int, seed: int) -> float:
    """MI between stage ``stage`` of ``module`` (globally pooled) and ``encoder``'s normalised features on the
    images ``x``: MINE trained for ``epochs`` (Adam 1e-3), the mean of the last :data:`MI_TAIL` epochs'
    estimates, clipped at 0. The encoder runs in eval mode and is not changed."""
    capture = StageCapture(module, [stage])
    modes = {m: m.training for m in encoder.modules()}
    encoder.eval()
    try:
        with torch.no_grad():
            pooled, zs = [], []
            for s in range(0, len(x), batch_size):
                zs.append(F.normalize(encoder(x[s : s + batch_size]), dim=1))
                pooled.append(global_average(capture.outputs[stage]))
            stage_features, z = torch.cat(pooled), torch.cat(zs)
    finally:
        capture.remove()
        for m, training in modes.items():
            m.training = training
    statistics = MINEStatistics(stage_features.shape[1] + z.shape[1], hidden).to(x.device)
    optimizer = torch.optim.Adam(statistics.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    estimates = []
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            total, count = 0.0, 0
            for s in range(0, len(x), batch_size):
                index = order[s : s + batch_size]
                if len(index) < 2:
                    continue
                permutation = torch.randperm(len(index), generator=gen).to(x.device)
                bound = donsker_varadhan(statistics, stage_features[index], z[index], permutation)
                optimizer.zero_grad(set_to_none=True)
                (-bound).backward()
                optimizer.step()
                total, count = total + bound.item() * len(index), count + len(index)
            estimates.append(total / max(count, 1))
    value = sum(estimates[-MI_TAIL:]) / len(estimates[-MI_TAIL:])
    return max(0.0, value) if math.isfinite(value) else 0.0


def stage_weights(information: list[float], base: float, scale: float) -> list[float]:
    """``λ_l = base + scale · MI_l / Σ MI``; uniform (``base + scale / L``) when every MI is 0."""
    total = sum(information)
    if total <= 0:
        return [base + scale / len(information)] * len(information)
    return [base + scale * mi / total for mi in information]
