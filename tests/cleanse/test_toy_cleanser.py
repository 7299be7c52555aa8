"""A second cleanser written here against the protocols only (Cleanser, CleanseReport, the loop, the registry)
runs through the Python API and the ``trojanguard cleanse`` command without any change to library code."""

import copy
import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

from trojanguard.cleanse import CLEANSERS, Cleanser, CleanseReport, Evaluation, register_cleanser, train
from trojanguard.cleanse.base import UnlabeledImages, config_with, model_device, preflight
from trojanguard.cli import main
from trojanguard.models import SmallCNN, load_model, save_model

pytestmark = pytest.mark.filterwarnings("ignore:data. only:UserWarning")  # small test data sets warn


@dataclass(frozen=True)
class ShrinkConfig:
    epochs: int = field(default=2, metadata={"help": "epochs"})
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate"})
    batch_size: int = field(default=32, metadata={"help": "images per batch"})
    seed: int = field(default=0, metadata={"help": "data order"})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay of the head"})  # the toy's own option


class ShrinkHead(Cleanser):
    """A toy: trains only the model's last linear layer, to shrink its logits on the unlabeled images."""

    def __init__(self, *, config: ShrinkConfig | None = None, **settings):
        self.config = config_with(ShrinkConfig, config, settings, owner="ShrinkHead")
        self.report = None

    def cleanse(self, model, data, *, evaluation=None):
        device = model_device(model)
        images = UnlabeledImages(data, self.batch_size, self.seed)
        preflight(model.eval(), images.sample(), device)
        student = copy.deepcopy(model).eval().requires_grad_(False)
        head = [m for m in student.modules() if isinstance(m, nn.Linear)][-1]
        head.requires_grad_(True)
        report = CleanseReport("ShrinkHead", self.report_config())
        if evaluation is not None:
            report.before = evaluation(model)
        trained = train(student, lambda x, epoch, index: student(x).pow(2).mean(), images,
                        optimizer=torch.optim.SGD(head.parameters(), lr=self.lr, weight_decay=self.weight_decay), epochs=self.epochs, device=device,
                        evaluation=evaluation, show_progress=False, desc="shrink")
        report.images, report.epochs = trained.images, trained.rows
        report.after = trained.rows[-1].metrics
        self.report = report
        return student


def _build(*, init=None, **settings):
    """What the command calls: the options the user gave (fields of ShrinkConfig) and ``init`` (unused here)."""
    return ShrinkHead(**settings)


@pytest.fixture
def toy_registered(monkeypatch):
    """``register_cleanser`` into a copy of the registry, undone after the test."""
    import trojanguard.cleanse
    from trojanguard.cleanse import registry

    registered = dict(CLEANSERS)
    monkeypatch.setattr(registry, "CLEANSERS", registered)
    monkeypatch.setattr(trojanguard.cleanse, "CLEANSERS", registered)
    register_cleanser("shrink", _build, "shrink the last layer's logits (a test toy)", display_name="ShrinkHead",
                      config=ShrinkConfig)
    assert "shrink" in registered and "shrink" not in CLEANSERS
    return registered


def _only_the_head_shrank(before: nn.Module, after: nn.Module, x: torch.Tensor) -> None:
    head = [name for name, m in before.named_modules() if isinstance(m, nn.Linear)][-1]
    a, b = before.state_dict(), after.state_dict()
    changed = {name for name in a if not torch.equal(a[name], b[name])}
    assert changed and {name.rsplit(".", 1)[0] for name in changed} == {head}
    with torch.no_grad():
        assert after.eval()(x).pow(2).mean() < before.eval()(x).pow(2).mean()


def test_the_toy_runs_through_the_python_api():
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
    toy = ShrinkHead(epochs=2)
    cleansed = toy.cleanse(model, x, evaluation=Evaluation(x[:32], y[:32]))
    _only_the_head_shrank(model, cleansed, x)
    assert [row.epoch for row in toy.report.epochs] == [1, 2] and toy.report.images == 128
    assert set(toy.report.after) == {"clean_accuracy"} and "ShrinkHead(epochs=2" in repr(toy)
    assert json.loads(toy.report.to_json())["config"] == {"epochs": 2, "lr": 0.1, "batch_size": 32, "seed": 0,
                                                          "weight_decay": 0.0}


def test_the_toy_runs_through_the_cleanse_command(tmp_path, capsys, toy_registered):
    torch.manual_seed(0)
    model_path = save_model(SmallCNN(), tmp_path / "suspicious.safetensors")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "unlabeled.npz", x=rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "toy.safetensors"
    rc = main(["cleanse", "--method", "shrink", "--model", str(model_path), "--arch", "small_cnn",
               "--data", str(tmp_path / "unlabeled.npz"), "--epochs", "2", "--weight-decay", "0.001",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "with ShrinkHead on 120 unlabeled images" in printed.err
    report = json.loads((tmp_path / "toy.report.json").read_text())
    assert report["method"] == "ShrinkHead" and report["images"] == 120 and len(report["epochs"]) == 2
    assert report["config"] == {"epochs": 2, "lr": 0.1, "batch_size": 32, "seed": 0, "weight_decay": 0.001}
    assert report["details"]["data"] == str(tmp_path / "unlabeled.npz")
    assert "ShrinkHead: 120 unlabeled images, 2 epochs" in printed.out
    x = torch.from_numpy(np.load(tmp_path / "unlabeled.npz")["x"]).permute(0, 3, 1, 2).float() / 255
    _only_the_head_shrank(load_model(model_path, "small_cnn"), load_model(out, "small_cnn"), x)


def test_the_toy_s_options_join_the_cleanse_command_help(capsys, toy_registered):
    """A registered config's fields are the command's options: shared ones once (each method keeps its default),
    the toy's own marked as its own."""
    with pytest.raises(SystemExit):
        main(["cleanse", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--weight-decay WEIGHT_DECAY SGD weight decay of the head (shrink only; default 0.0)" in text
    assert "--epochs EPOCHS distillation epochs (bcu, shrink only; default bcu auto; mimic 100; shrink 2)" not in text
    assert "(default bcu auto; cleanclip 10; mimic 100; shrink 2; ubt 5)" in text
    assert "{bcu,cleanclip,mimic,shrink,ubt}" in text
