"""The one training loop of the cleansers; each method contributes its per-batch step.

A method (BCU: knowledge distillation; MIMIC: clone + attention + NT-Xent; UBT: forget + retain) decides what
a batch costs — ``step(batch, epoch, index) -> loss`` — and which optimiser and schedule train which parameters.
:func:`train` owns everything else: epochs and progress, moving batches to the device, zero_grad / backward /
gradient clipping / optimiser step, the per-epoch schedule step, evaluation (with every module's train / eval
mode restored afterwards), the non-finite checks (a loss during training, any weight or buffer after it:
no half-trained model is returned) and one :class:`~trojanguard.cleanse.base.EpochRow` per epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trojanguard.cleanse.base import CleanseError, EpochRow, UnlabeledImages, check_count, extra_column
from trojanguard.errors import DataError
from trojanguard.progress import progress


@dataclass
class StepResult:
    """What a step may return instead of a bare loss: ``count`` weighs the batch in the epoch's mean loss (default:
    the batch's length); ``terms`` are parts of the loss to report, averaged over the epoch with the same weights
    into the row's ``extras`` (e.g. MIMIC's attention and contrastive terms, UBT's forget and retain losses)."""

    loss: torch.Tensor
    count: int | None = None
    terms: dict[str, float | torch.Tensor] = field(default_factory=dict)


Step = Callable[[Any, int, int], "torch.Tensor | StepResult"]


@dataclass
class Trained:
    """What :func:`train` returns: one row per epoch, and the number of examples the last epoch saw."""

    rows: list[EpochRow]
    images: int


def batch_length(batch) -> int:
    """Examples in a batch: a tensor's length; of a tuple / list / mapping, that of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return len(item)
    raise TypeError(f"batch: cannot tell how many examples a {type(batch).__name__} holds; return "
                    "StepResult(loss, count=...) from the step")


def to_device(batch, device: torch.device):
    """``batch`` with every tensor in it (also inside tuples, lists and mappings) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _epoch_batches(data, epoch: int) -> Iterable:
    """An :class:`UnlabeledImages` (or anything with ``epoch(e)``) yields epoch ``e``'s batches; any other iterable
    (a DataLoader, a list of batches) is iterated again every epoch."""
    return data.epoch(epoch) if hasattr(data, "epoch") else data


def _context(lr: float, extras: dict[str, float]) -> str:
    return f"lr {lr:g}" + "".join(f", {extra_column(k).symbol} {v:{extra_column(k).format}}" for k, v in extras.items())


def train(model: nn.Module, step: Step, data, *, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, epochs: int, device: torch.device,
          evaluation: Callable[[nn.Module], dict[str, float]] | None = None,
          on_epoch_start: Callable[[int], dict[str, float] | None] | None = None,
          max_grad_norm: float | None = None, loss_name: str = "loss",
          show_progress: bool = True, desc: str = "train") -> Trained:
    """Train ``model`` for ``epochs`` with ``optimizer`` on the losses of ``step``; return the per-epoch rows.

    ``step(batch, epoch, index)`` (0-based epoch and batch index) computes one batch's loss — a scalar tensor or
    a :class:`StepResult`; the batch arrives on ``device``. ``data``: an :class:`UnlabeledImages` (reshuffled
    every epoch; when its size was unknown, the first epoch's count is checked like a known one) or any iterable
    of batches. ``scheduler`` is stepped once per epoch, after its batches. ``on_epoch_start(epoch)`` returns the
    epoch's method-specific values (BCU: its temperature): they go into the row's ``extras`` and into the error
    message of a non-finite loss. ``evaluation(model) -> metrics`` runs after every epoch (the row's
    ``metrics``); every module's train / eval mode is restored after it. ``max_grad_norm`` clips the norm of
    the gradients of the optimiser's parameters. The model's modes (train, frozen parts) are the caller's.

    Raises :class:`CleanseError` when a loss is NaN / infinite (naming epoch, step, lr and the extras) or when
    a weight or buffer is after training, and :class:`DataError` when an epoch yields no batch.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    base_lr = optimizer.param_groups[0]["lr"]
    rows: list[EpochRow] = []
    seen = 0
    bar = progress(range(epochs), desc=desc, enable=show_progress, total=epochs)
    for epoch in bar:
        start = time.perf_counter()
        extras = dict(on_epoch_start(epoch) or {}) if on_epoch_start is not None else {}
        lr = optimizer.param_groups[0]["lr"]
        total, seen = 0.0, 0
        terms: dict[str, float] = {}
        for index, batch in enumerate(_epoch_batches(data, epoch)):
            result = step(to_device(batch, device), epoch, index)
            if not isinstance(result, StepResult):
                result = StepResult(result)
            loss = result.loss
            if not torch.isfinite(loss):
                raise CleanseError(f"{loss_name} became {loss.item()} at epoch {epoch + 1}, step {index + 1} "
                                   f"({_context(lr, extras)}); training diverged — lower lr, or check the model "
                                   "and data for NaN / infinite values. No model is returned.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            count = batch_length(batch) if result.count is None else result.count
            total += loss.item() * count
            for name, value in result.terms.items():
                value = value.detach() if isinstance(value, torch.Tensor) else value
                terms[name] = terms.get(name, 0.0) + float(value) * count
            seen += count
        if seen == 0:
            raise DataError("data: an epoch yielded no batch of at least 2 images"
                            if isinstance(data, UnlabeledImages) else "data: an epoch yielded no batch")
        if epoch == 0 and isinstance(data, UnlabeledImages) and data.count is None:
            check_count(seen, data.minimum, data.recommended)
        if scheduler is not None:
            scheduler.step()
        metrics: dict[str, float] = {}
        if evaluation is not None:
            modes = {m: m.training for m in model.modules()}
            try:
                metrics = evaluation(model)
            finally:
                for module, training in modes.items():
                    module.training = training
        extras.update({name: value / seen for name, value in terms.items()})
        rows.append(EpochRow(epoch + 1, total / seen, lr, time.perf_counter() - start, metrics, extras))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total / seen:.4f}", **{k[:3]: f"{v:.3f}" for k, v in metrics.items()})
    for name, tensor in model.state_dict().items():  # buffers too: batch-norm statistics can overflow alone
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CleanseError(f"the cleansed model holds NaN or infinite values in {name!r} after training "
                               f"(lr {base_lr:g}); training diverged — lower lr. No model is returned.")
    return Trained(rows, seen)
