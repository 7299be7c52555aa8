"""Knowledge distillation, BCU's training: teacher → student on unlabeled images (KL on temperature-softened
logits, or the logits themselves), no labels.

:class:`DistillationStep` is the per-batch step BCU feeds :func:`~trojanguard.cleanse._training.train` (one
augmentation per batch, the same augmented images to the frozen teacher and the student, τ ramped per epoch);
:func:`distill` sets up the authors' SGD + momentum + weight decay with a cosine schedule around it. Also here:
the batch-normalisation helpers that tell in- from out-of-distribution data, and the warnings about such data.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trojanguard.cleanse._training import StepResult, train
from trojanguard.cleanse.base import EpochRow, UnlabeledImages

# ---------------------------------------------------------------------------------------------------------
# losses


def temperature_at(epoch: int, epochs: int, temperature: tuple[float, float]) -> float:
    """τ for 0-based ``epoch``: linear from ``τ0`` to ``τ1`` reached at the last epoch (authors: 1 + 3(e+1)/E)."""
    start, end = temperature
    return start + (end - start) * (epoch + 1) / epochs


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(T/τ) ‖ softmax(S/τ)), batch mean, no τ² factor (METHODS.md §3). Logits: (B, K)."""
    return F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                    reduction="batchmean", log_target=True)


def logit_matching_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean squared difference of the logits (Ba & Caruana 2014; τ unused). Logits: (B, K).

    On out-of-distribution data the teacher is often confident, and a softmax then hides all but its top
    logit; matching the logits transfers the whole output (docs/cleansing.md has the measurement)."""
    return (student_logits - teacher_logits).pow(2).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "kl": distillation_loss, "mse": logit_matching_loss}


# ---------------------------------------------------------------------------------------------------------
# settings and batch normalisation


@dataclass(frozen=True)
class DistillSettings:
    """The distillation loop's hyperparameters (authors' values; METHODS.md §3)."""

    epochs: int = 20
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: tuple[float, float] = (1.0, 4.0)
    norm_stats: str = "update"
    max_grad_norm: float | None = None
    loss: str = "kl"


NORM_STATS = ("auto", "keep", "update")
AGREEMENT_KEEP = 0.9  # norm_stats="auto" keeps the teacher's statistics when fewer of the data's predictions than
# this survive batch statistics (see batch_statistics_agreement; measured, benchmarks/RESULTS.md: held-out training
# and test images 0.977–1.000 on the small CNN and a CIFAR ResNet-18, adapted photo crops 0.555–0.688, raw 0.336–0.676)
AGREEMENT_BATCH = 64  # images per batch whose statistics batch_statistics_agreement normalises with
KEEP_MAX_GRAD_NORM = 5.0  # max_grad_norm="auto" with kept statistics: eval-mode batch norm amplifies far
# out-of-distribution inputs (running variance ~1e-3 in some channels) and unclipped SGD diverged once (KL, grey
# photos: CA 0.106); a bound of 1.0 held learning back (Blended on edge maps: ASR 0.50 left; 5.0: ASR 0.02)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_normalisation(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


@torch.no_grad()
def normalisation_gap(model: nn.Module, x: torch.Tensor) -> float | None:
    """How far the data's feature statistics lie from those the model's batch-norm layers recorded in training.

    For every batch-norm layer with running statistics: the RMS over channels of the batch mean's distance to
    the running mean in running standard deviations, plus the mean |log| ratio of batch to running standard
    deviation (the statistics DeepInversion matches); averaged over layers. ~0 on the training distribution,
    growing with the shift; None when the model has no such layer. ``x: (N, C, H, W)`` on the model's device.
    """
    gaps: list[float] = []

    def hook(module, inputs, _output):
        a = inputs[0].transpose(0, 1).flatten(1).float()
        std = (module.running_var + module.eps).sqrt()
        shift = ((a.mean(1) - module.running_mean) / std).pow(2).mean().sqrt()
        scale = (a.std(1, unbiased=False) / std).clamp_min(1e-6).log().abs().mean()
        gaps.append(float(shift + scale))

    layers = _running_stat_norms(model)
    hooked_eval_pass(model, x, [m.register_forward_hook(hook) for m in layers])
    return sum(gaps) / len(gaps) if gaps else None


def hooked_eval_pass(model: nn.Module, x: torch.Tensor, hooks: list) -> None:
    """One eval-mode forward pass of ``model`` on ``x`` for the ``hooks`` (handles) registered on it; the hooks
    are removed and every module's train/eval mode is restored afterwards, whatever happens."""
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in was_training.items():
            m.training = flag


def _running_stat_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_var is not None]


@torch.no_grad()
def batch_statistics_agreement(model: nn.Module, x: torch.Tensor, batch_size: int = AGREEMENT_BATCH) -> float | None:
    """Share of the images ``x`` whose predicted class is the same when batch norm normalises with its running
    statistics (eval mode) and with the statistics of the data's own batches of ``batch_size`` (train mode, as
    training on the data would). None when the model has no batch norm with running statistics.

    Training with batch norm in train mode replaces the teacher's statistics by the data's; this measures, before
    any training, whether that alone changes what the model computes. Near the training distribution the
    statistics agree and so do the predictions; on far data they do not (docs/cleansing.md has the measured
    ranges). Unlike :func:`normalisation_gap` it is a share of predictions, so it does not grow with depth the way
    eval-mode statistics drift, and it does not depend on a reference input. Only batch-norm layers
    change mode (dropout stays off); the model is not modified. ``x: (N, C, H, W)`` on the model's device."""
    if not _running_stat_norms(model):
        return None
    probe = copy.deepcopy(model).eval()  # train-mode batch norm updates running statistics: never on the model
    batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    batches = [b for b in batches if len(b) >= 2]  # batch statistics need two images
    if not batches:
        return None
    running = torch.cat([probe(b).argmax(1) for b in batches])
    for module in _running_stat_norms(probe):
        module.train()
    batch = torch.cat([probe(b).argmax(1) for b in batches])
    return float((running == batch).double().mean())


def train_mode(student: nn.Module, norm_stats: str) -> None:
    """Student in train mode; with ``norm_stats='keep'`` normalisation layers stay in eval mode, so batch norm
    normalises with (and keeps) the teacher's running statistics instead of those of the distillation data."""
    student.train()
    if norm_stats == "keep":
        for module in student.modules():
            if is_normalisation(module):
                module.eval()


# ---------------------------------------------------------------------------------------------------------
# the step and the loop


VIEW_TARGETS = ("view", "source", "consistent")  # what the student's view is distilled towards (DistillationStep)
EVOKED_CLASS_GAIN = 0.05  # view_target="auto": the teacher answers on the source when augmenting moves more than this
# share of the data into one class (zoo teachers, label-preserving crops: <= 0.02; crops that evoked a backdoor: 0.07-0.19)


@torch.no_grad()
def evoked_class_gain(teacher: nn.Module, x: torch.Tensor,
                      augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor], seed: int) -> float:
    """The largest net share of images ``x`` the augmentation moves into one class of the teacher: max over classes
    of (share of augmented views in the class − share of the source images in it). Needs no labels. A
    label-preserving augmentation moves few images and in no particular direction; one that makes clean images look
    like a trigger to a backdoored teacher moves them into its target (issue 16: BCU's zero-padded crop on teachers
    trained without random shifts). ``x: (N, C, H, W)`` on the teacher's device; the teacher is not modified."""
    teacher = teacher.eval()
    views = augment(x, torch.Generator().manual_seed(seed + 17))
    if not len(x):
        return 0.0
    logits = teacher(x)
    classes = logits.shape[1]
    source = torch.bincount(logits.argmax(1).cpu(), minlength=classes).double()
    viewed = torch.bincount(teacher(views).argmax(1).cpu(), minlength=classes).double()
    return float(((viewed - source) / len(x)).max())


class DistillationStep:
    """BCU's step: augment the batch once (generator seeded ``seed + 17``); the frozen teacher's logits are the
    target of the student's logits on the augmented view, by ``settings.loss`` at the epoch's temperature.

    ``view_target`` says on which image the teacher answers (without augmentation all three are the same):

    * ``"view"`` (the authors') — on the same augmented view the student sees;
    * ``"source"`` — on the un-augmented source image: an augmentation that makes a clean image look like a
      trigger to the backdoored teacher then cannot make it answer with its target (issue 16), and the student
      learns the teacher's clean answer for the view;
    * ``"consistent"`` — on the view, but views whose teacher class differs from the class on their source are
      left out of the loss (the student still sees the whole batch, for batch norm).

    Counts the classes of the teacher's targets over the first epoch (:meth:`class_shares`, see
    :func:`dominant_class_warning`) and the share of views whose teacher class differs from the source's
    (:attr:`view_change`, also measured for ``"view"``: a label-free sign that the augmentation is not
    label-preserving for this teacher)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, settings: DistillSettings, *, seed: int,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 view_target: str = "view"):
        if view_target not in VIEW_TARGETS:
            raise ValueError(f"view_target: expected one of {VIEW_TARGETS}, got {view_target!r}")
        self.student, self.teacher, self.settings, self.augment = student, teacher, settings, augment
        self.view_target = view_target
        self.loss = LOSSES[settings.loss]
        self.generator = torch.Generator().manual_seed(seed + 17)
        self.tau = temperature_at(0, settings.epochs, settings.temperature)
        self.class_counts: torch.Tensor | None = None
        self.changed, self.views = 0, 0  # first epoch: views whose teacher class differs from the source's

    def start_epoch(self, epoch: int) -> dict[str, float]:
        """The epoch's temperature, for the step and the report's row."""
        self.tau = temperature_at(epoch, self.settings.epochs, self.settings.temperature)
        return {"temperature": self.tau}

    def __call__(self, batch, epoch: int, index: int) -> StepResult:
        x, answered = batch if isinstance(batch, tuple) else (batch, None)  # answered: the teacher's, cached
        source = x
        if self.augment is not None:
            x = self.augment(x, self.generator)
        augmented = self.augment is not None
        teach_source = augmented and self.view_target == "source"
        with torch.no_grad():  # the first epoch measures both answers whatever the mode (view_change)
            on_view = answered if answered is not None else self.teacher(x) if not teach_source or epoch == 0 else None
            on_source = self.teacher(source) if augmented and (self.view_target != "view" or epoch == 0) else None
        keep = None
        if on_source is not None and on_view is not None:
            same = on_view.argmax(1) == on_source.argmax(1)
            if epoch == 0:
                self.changed += int((~same).sum())
                self.views += len(same)
            if self.view_target == "consistent":
                keep = same
        target = on_source if teach_source else on_view
        if epoch == 0:  # the classes the student is taught (with "consistent": of the views kept)
            taught = target if keep is None else target[keep]
            counts = torch.bincount(taught.argmax(1).cpu(), minlength=target.shape[1])
            self.class_counts = counts if self.class_counts is None else self.class_counts + counts
        logits = self.student(x)
        if keep is None:
            return StepResult(self.loss(logits, target, self.tau), len(x))
        kept = int(keep.sum())
        if kept == 0:  # nothing to learn from this batch: a zero loss that still has a graph
            return StepResult(logits.sum() * 0.0, 0)
        return StepResult(self.loss(logits[keep], target[keep], self.tau), kept)

    def class_shares(self) -> list[float]:
        """Share of the first epoch's images the teacher assigned to each class."""
        counts = self.class_counts
        return [] if counts is None else (counts.double() / counts.sum()).tolist()

    @property
    def view_change(self) -> float | None:
        """Share of the first epoch's views whose teacher class differs from the source's (None: no augmentation)."""
        return self.changed / self.views if self.views else None


class AnsweredImages:
    """A tensor data set's batches paired with the teacher's answers, computed once per image. Without augmentation
    the frozen eval-mode teacher gives the same answer on an image every epoch, so asking it again each epoch only
    repeats work (on the small CNN a third of a distillation step)."""

    ANSWER_BATCH = 256

    @torch.no_grad()
    def __init__(self, images: UnlabeledImages, teacher: nn.Module, device: torch.device):
        x = images.x
        self.images = images
        self.answers = torch.cat([teacher(x[i : i + self.ANSWER_BATCH].to(device))
                                  for i in range(0, len(x), self.ANSWER_BATCH)]).cpu()

    def epoch(self, epoch: int):
        return self.images.epoch(epoch, paired=self.answers)


def distill(student: nn.Module, teacher: nn.Module, data: UnlabeledImages, settings: DistillSettings, *,
            device: torch.device, seed: int, augment=None, view_target: str = "view",
            evaluation: Callable[[nn.Module], dict[str, float]] | None = None,
            show_progress: bool = True, desc: str = "distil") -> tuple[list[EpochRow], int, list[float]]:
    """Train ``student`` (train mode) to match the frozen ``teacher`` (eval mode) on unlabeled batches.

    SGD + momentum + weight decay, cosine learning rate over the epochs (stepped per epoch), temperature
    ramped per epoch; ``augment`` is applied once per batch and the *same* augmented images go to teacher
    and student (:class:`DistillationStep`, run by :func:`~trojanguard.cleanse._training.train`). Returns the
    per-epoch rows, the number of images seen in one epoch, the share of the first epoch's images the teacher
    assigns to each class (a diagnostic: see :func:`dominant_class_warning`) and the share of the first epoch's
    views whose teacher class differs from the source's (None without augmentation; ``view_target``: see
    :class:`DistillationStep`). A non-finite loss stops training
    with :class:`CleanseError` (no half-trained model is returned).
    """
    teacher.eval().requires_grad_(False)
    train_mode(student, settings.norm_stats)
    student.requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs)
    step = DistillationStep(student, teacher, settings, seed=seed, augment=augment, view_target=view_target)
    batches = data if augment is not None or data.x is None else AnsweredImages(data, teacher, device)
    trained = train(student, step, batches, optimizer=opt, scheduler=sched, epochs=settings.epochs, device=device,
                    evaluation=evaluation, on_epoch_start=step.start_epoch, max_grad_norm=settings.max_grad_norm,
                    loss_name="distillation loss", show_progress=show_progress, desc=desc)
    return trained.rows, trained.images, step.class_shares(), step.view_change


# ---------------------------------------------------------------------------------------------------------
# warnings about the data


def far_data_warning(agreement: float | None, recipe_forced: bool = False) -> str | None:
    """A warning when the unlabeled data lies far from the model's training distribution (batch-statistics
    agreement below ``AGREEMENT_KEEP``). Distillation carries over whatever the teacher does on the data, and on far
    data a teacher can respond to trigger-like features everywhere: on the digits zoo natural-photo crops removed
    some backdoors and left others, while a student distilled on the same crops from a clean teacher has none
    (docs/cleansing.md). The numbers it quotes are the far-data defaults' measured worst cases
    (benchmarks/bcu_families_ood_results.jsonl, ``epochs40+no_augment``: ASR ≥ 0.5 kept on SIG, WaNet and Trojan;
    CA −15.9 points at worst)."""
    if agreement is None or agreement >= AGREEMENT_KEEP:
        return None
    recipe = "" if recipe_forced else "; BCU switched to its out-of-distribution recipe"
    return (f"data: it looks out-of-distribution for this model (batch-statistics agreement {agreement:.2f} < "
            f"{AGREEMENT_KEEP}){recipe}. On such data BCU removes some backdoors but not others (digits zoo on photo "
            "crops: SIG, WaNet and Trojan kept most of theirs) and can cost clean accuracy (up to 16 points): prefer "
            "in-distribution images, and test the cleansed model on labelled data and against any trigger you suspect")


def prediction_agreement(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    """Share of images ``x`` on which the student's class equals the teacher's (both in eval mode, no
    augmentation): how much of the teacher's behaviour on the data the distillation carried over."""
    if not len(x):
        return 1.0
    student, teacher = student.eval(), teacher.eval()
    return float((student(x).argmax(1) == teacher(x).argmax(1)).double().mean())


def unverified_note(agreement: float, top_share: float) -> str:
    """What a report says when no labelled evaluation was given: BCU cannot tell by itself whether the backdoor is
    gone, so it states what it measured without labels and what to do (issue 16)."""
    return (f"not verified: without labels BCU cannot measure attack success; on the data the cleansed model agrees "
            f"with the original on {100 * agreement:.0f}% of the images (clean behaviour carried over) and the original "
            f"put {100 * top_share:.0f}% of them into one class. Screen the data first (trojanguard screen) and cleanse "
            "on the kept images, then test the cleansed model against any trigger you suspect")


DOMINANT_CLASS_SHARE = 0.5  # warn when the teacher puts more of the unlabeled data than this into one class


def dominant_class_warning(shares: list[float]) -> str | None:
    """A warning when the teacher assigns most of the unlabeled data to one class. On data that resembles a
    trigger (e.g. textured photos for a blended-noise backdoor) a backdoored model predicts its target class,
    and distillation then copies the backdoor (docs/cleansing.md: Blended on natural-photo crops)."""
    if len(shares) < 3 or max(shares) <= DOMINANT_CLASS_SHARE:
        return None
    top = max(range(len(shares)), key=shares.__getitem__)
    return (f"data: the model assigns {100 * shares[top]:.0f}% of the unlabeled images to class {top}; if class {top} "
            "is a backdoor target, distilling on these images carries the backdoor over — prefer in-distribution data")

