"""The one training loop (issue 14): BCU's distillation step through it equals a hand-written SGD / cosine / KL
loop exactly; MIMIC's shape (Adam, a contrastive loss on an encoder) and UBT's (an optimiser over selected
parameter rows only) run through the same loop; its checks (non-finite loss, empty epoch) and rows."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trojanguard.cleanse import (
    CleanseError,
    CleanseReport,
    DistillationStep,
    DistillSettings,
    EpochRow,
    LinearProbeEvaluation,
    StepResult,
    distillation_loss,
    temperature_at,
    train,
)
from trojanguard.cleanse.augment import random_crop_flip
from trojanguard.cleanse.base import UnlabeledImages
from trojanguard.cleanse.distillation import distill, train_mode
from trojanguard.errors import DataError
from trojanguard.metrics import clean_accuracy

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:data. only:UserWarning")  # small test data sets warn


def _tiny_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 5))


def _reference_distillation(student, teacher, data, settings, seed, evaluation):
    """BCU's distillation written out by hand: SGD + momentum + weight decay, cosine per epoch, τ ramp, crop
    augmentation from a generator seeded seed + 17, the same augmented batch to teacher and student."""
    teacher.eval().requires_grad_(False)
    train_mode(student, settings.norm_stats)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs)
    gen = torch.Generator().manual_seed(seed + 17)
    losses, metrics = [], []
    for epoch in range(settings.epochs):
        tau = temperature_at(epoch, settings.epochs, settings.temperature)
        total, seen = 0.0, 0
        for x in data.epoch(epoch):
            x = random_crop_flip(x, gen, flip=False)
            with torch.no_grad():
                target = teacher(x)
            loss = distillation_loss(student(x), target, tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            total, seen = total + loss.item() * len(x), seen + len(x)
        sched.step()
        metrics.append(evaluation(student))
        train_mode(student, settings.norm_stats)
        losses.append(total / seen)
    return losses, metrics


@pytest.mark.parametrize("norm_stats", ["update", "keep"])
def test_distillation_through_the_loop_equals_a_hand_written_loop_exactly(norm_stats):
    teacher = _tiny_cnn(0).eval()
    x, y = torch.rand(150, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randint(0, 5, (150,))
    settings = DistillSettings(epochs=3, lr=0.05, norm_stats=norm_stats, max_grad_norm=1.0)

    def evaluation(model):  # puts the whole model in eval mode, then back to train: the loop must restore "keep"
        return {"clean_accuracy": clean_accuracy(model, x[:40], y[:40])}

    student, reference = _tiny_cnn(2), _tiny_cnn(2)
    torch.manual_seed(5)
    rows, images, shares, _ = distill(student, copy.deepcopy(teacher), UnlabeledImages(x, 32, seed=3), settings,
                                   device=CPU, seed=3, augment=lambda t, g: random_crop_flip(t, g, flip=False),
                                   evaluation=evaluation, show_progress=False)
    torch.manual_seed(5)
    losses, metrics = _reference_distillation(reference, copy.deepcopy(teacher), UnlabeledImages(x, 32, seed=3),
                                              settings, 3, evaluation)
    assert [row.loss for row in rows] == losses  # exact: same draws, same order, same arithmetic
    assert [row.metrics for row in rows] == metrics
    for name, tensor in reference.state_dict().items():
        assert torch.equal(student.state_dict()[name], tensor), name
    assert [m.training for m in student.modules()] == [m.training for m in reference.modules()]
    assert [row.extras for row in rows] == [{"temperature": temperature_at(e, 3, (1.0, 4.0))} for e in range(3)]
    assert images == 150 and len(shares) == 5 and sum(shares) == pytest.approx(1.0)


def test_a_bcu_row_reads_as_before_in_json_and_in_the_table():
    row = EpochRow(1, 0.25, 0.01, 1.5, {"clean_accuracy": 0.9}, {"temperature": 2.5})
    assert list(row.to_dict()) == ["epoch", "loss", "temperature", "lr", "seconds", "metrics"]
    report = CleanseReport("BCU", {}, images=100, epochs=[row])
    assert report.format().splitlines()[1:] == [
        "epoch   tau       lr      loss clean_accuracy", "    1  2.50  0.01000   0.25000         0.9000"]
    plain = CleanseReport("Toy", {}, epochs=[EpochRow(1, 0.25, 0.01, 1.5)])
    assert plain.format().splitlines()[1:] == ["epoch       lr      loss", "    1  0.01000   0.25000"]


def test_a_non_finite_loss_stops_training_naming_epoch_step_lr_and_the_extras():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.rand(3, 4) for _ in range(3)]

    def step(x, epoch, index):
        loss = model(x).pow(2).mean()
        return loss * float("nan") if (epoch, index) == (1, 2) else loss

    with pytest.raises(CleanseError, match=r"^distillation loss became nan at epoch 2, step 3 \(lr 0\.1, τ 2\.50\); "
                                           r"training diverged — lower lr"):
        train(model, step, batches, optimizer=opt, epochs=3, device=CPU, loss_name="distillation loss",
              on_epoch_start=lambda e: {"temperature": 1.0 + 1.5 * e}, show_progress=False)


def test_an_epoch_without_a_batch_is_refused():
    model = nn.Linear(4, 2)
    with pytest.raises(DataError, match="epoch yielded no batch"):
        train(model, lambda x, e, i: model(x).sum(), [], optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
              epochs=1, device=CPU, show_progress=False)


def _nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent: each view's positive is the other view of the same image, all else negatives."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
    n = len(a)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, positives)


def test_an_adam_driven_contrastive_step_on_an_encoder_runs_through_the_loop():
    """MIMIC's shape: clone an encoder's features and contrast two views (NT-Xent), with Adam, measured by a
    linear probe each epoch; the parts of the loss land in the rows' extras."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 4
    x = torch.rand(120, 1, 4, 4, generator=g) * 0.3
    x[torch.arange(120), 0, 0, y] = 1.0  # class c lights pixel (0, c)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 8)).eval().requires_grad_(False)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def step(batch, epoch, index):
        view_a = batch + 0.05 * torch.randn(batch.shape, generator=g)
        view_b = batch + 0.05 * torch.randn(batch.shape, generator=g)
        clone = F.mse_loss(student(batch), teacher(batch))
        contrast = _nt_xent(student(view_a), student(view_b))
        return StepResult(clone + 0.1 * contrast, terms={"clone": clone, "contrast": contrast})

    probe = LinearProbeEvaluation(x[:60], y[:60], x[60:], y[60:])
    trained = train(student, step, UnlabeledImages(x, 30, seed=0), optimizer=opt, scheduler=sched, epochs=4,
                    device=CPU, evaluation=probe, show_progress=False)
    rows = trained.rows
    assert trained.images == 120 and [row.lr for row in rows] == [1e-2, 5e-3, 2.5e-3, 1.25e-3]
    assert rows[-1].loss < rows[0].loss
    assert all(set(row.extras) == {"clone", "contrast"} for row in rows)
    assert all(row.loss == pytest.approx(row.extras["clone"] + 0.1 * row.extras["contrast"]) for row in rows)
    assert rows[-1].metrics["clean_accuracy"] >= 0.9
    assert student.training  # the probe's eval mode does not leak into training


def test_an_optimiser_over_selected_rows_only_leaves_the_other_rows_unchanged():
    """UBT's shape: forget + retain losses on a token embedding, the optimiser updating only the selected rows
    (a gradient mask); batches are (forget, retain) pairs of token ids."""
    torch.manual_seed(0)
    embedding, head = nn.Embedding(10, 4), nn.Linear(4, 3)
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    head.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    selected = torch.tensor([2, 7])
    mask = torch.zeros(10, 1)
    mask[selected] = 1.0
    embedding.weight.register_hook(lambda grad: grad * mask)
    opt = torch.optim.SGD([embedding.weight], lr=0.5, momentum=0.9)
    forget = torch.tensor([2, 7, 2, 7])
    retain = torch.tensor([0, 1, 3, 4])
    batches = [(forget, retain)] * 3

    def step(batch, epoch, index):
        forget_ids, retain_ids = batch
        forget_loss = -F.cross_entropy(head(embedding(forget_ids)), torch.zeros(len(forget_ids), dtype=torch.long))
        retain_loss = F.cross_entropy(head(embedding(retain_ids)), torch.ones(len(retain_ids), dtype=torch.long))
        return StepResult(forget_loss + retain_loss, terms={"forget": forget_loss, "retain": retain_loss})

    rows = train(model, step, batches, optimizer=opt, epochs=2, device=CPU, show_progress=False).rows
    after = model.state_dict()
    others = torch.tensor([i for i in range(10) if i not in selected.tolist()])
    assert torch.equal(after["embedding.weight"][others], before["embedding.weight"][others])
    assert not torch.equal(after["embedding.weight"][selected], before["embedding.weight"][selected])
    assert torch.equal(after["head.weight"], before["head.weight"]) and torch.equal(after["head.bias"], before["head.bias"])
    assert rows[1].extras["forget"] < rows[0].extras["forget"]  # the forget set's loss is pushed up (negated)


def test_distillation_step_counts_the_teachers_classes_in_the_first_epoch_only():
    teacher = _tiny_cnn(0).eval()
    settings = DistillSettings(epochs=2)
    step = DistillationStep(_tiny_cnn(1), teacher, settings, seed=0)
    x = torch.rand(6, 3, 8, 8)
    step(x, 0, 0)
    step(x, 1, 0)
    assert step.class_shares() == pytest.approx(
        (torch.bincount(teacher(x).argmax(1), minlength=5).double() / 6).tolist())
