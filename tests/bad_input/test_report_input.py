"""Bad input to the screening run's output side (issue 13): an --out folder holding someone else's files, an --out
that is a file, and a --device that does not exist here — each one line, nothing overwritten. Plus the defaults
that replaced silent behaviour: --device auto and the exact command line in the report."""

import argparse
import json

import numpy as np
import pytest
import torch

from trojanguard.cli import build_parser
from trojanguard.models import build_model, save_model
from trojanguard.screening import ResumeError, screen


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-input")
    torch.manual_seed(0)
    save_model(build_model("small_cnn", num_classes=4).eval(), root / "model.safetensors")
    x = (torch.rand(12, 16, 16, 3, generator=torch.Generator().manual_seed(3)) * 255).round().to(torch.uint8)
    np.savez(root / "data.npz", x=x.numpy())
    return root


def screen_argv(files, out, *extra):
    return ["screen", "--model", files / "model.safetensors", "--arch", "small_cnn", "--num-classes", "4",
            "--data", files / "data.npz", "--detector", "features", "--calibration", "none", "--device", "cpu",
            "--out", out, *extra]


def _unrelated_folder(tmp_path):
    folder = tmp_path / "website"
    folder.mkdir()
    (folder / "index.html").write_text("<h1>my page</h1>")
    return folder


def _a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    return path


def _foreign_results(tmp_path):
    folder = tmp_path / "other-tool"
    folder.mkdir()
    (folder / "results.csv").write_text("id,score\n1,0.5\n")
    return folder


OUT_CASES = [  # (make, words of the Python API's error, words and exit code of the CLI's)
    pytest.param(_unrelated_folder, ("--out", "expected a new or empty folder", "index.html"), 1, id="unrelated-files"),
    pytest.param(_a_file, ("--out", "expected a folder", "file"), 2, id="out-is-a-file"),  # a command-line mistake
    pytest.param(_foreign_results, ("--out", "expected a new or empty folder", "no screening results"), 1,
                 id="foreign-results-csv"),
    pytest.param(lambda tmp_path: _a_file(tmp_path) / "run", ("--out", "expected a", "notes.txt", "file"), 2,
                 id="inside-a-file"),
]


def _contents(path):
    """The bytes of what ``path`` names (a file, a folder's files, or the file a path below a file runs into)."""
    while not path.exists():
        path = path.parent
    if path.is_file():
        return path.read_bytes()
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("make, words, code", OUT_CASES)
def test_out_that_is_not_ours_is_refused_and_left_alone(files, tmp_path, cli, expect_error, make, words, code):
    out = make(tmp_path)
    before = _contents(out)
    for restart in ((), ("--restart",)):  # --restart discards an earlier run's results, never someone else's files
        expect_error(cli(*screen_argv(files, out, *restart)), code, *words)
    assert _contents(out) == before


def test_out_refusal_through_the_real_entry_point(files, tmp_path, cli, expect_error):
    out = _unrelated_folder(tmp_path)
    expect_error(cli(*screen_argv(files, out), subprocess=True), 1, "--out", "index.html", "choose a new")
    assert _contents(out) == {"index.html": b"<h1>my page</h1>"}


@pytest.mark.parametrize("make, words, code", OUT_CASES)
def test_out_refusal_in_python(files, tmp_path, make, words, code):
    out = make(tmp_path)
    before = _contents(out)
    pattern = "out_dir: " + words[1]
    with pytest.raises(ResumeError, match=pattern):
        screen(build_model("small_cnn", num_classes=4).eval(), torch.rand(6, 3, 16, 16), out_dir=out,
               detector="features", calibration=None, overwrite=True, show_progress=False)
    assert _contents(out) == before


def test_an_earlier_run_or_an_empty_folder_is_accepted_and_the_work_kept(files, tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    first = cli(*screen_argv(files, empty))
    assert first.code == 0, first.err
    rows = (empty / "results.csv").read_text()
    again = cli(*screen_argv(files, empty))  # a folder of an earlier screen run: resumed (here: already complete)
    assert again.code == 0 and "nothing left to screen" in again.out
    assert (empty / "results.csv").read_text().splitlines()[1:] == rows.splitlines()[1:]
    summary = json.loads((empty / "summary.json").read_text())
    assert summary["command"].startswith("trojanguard screen --model ") and "--device cpu" in summary["command"]
    assert summary["command"] in (empty / "index.html").read_text()
    assert "time:" in first.out and "images/s scoring only" in first.out and "end to end" in first.out
    assert (empty / "kept.txt").read_text().splitlines() + (empty / "flagged.txt").read_text().splitlines() != []


@pytest.mark.parametrize("device, words", [
    ("gpu", ("--device", "expected auto, cpu, cuda", "'gpu'")),
    ("cuda:99", ("--device", "CUDA device(s)", "'cuda:99'") if torch.cuda.is_available()
     else ("--device", "CUDA is not available here")),
    ("tpu", ("--device", "expected auto, cpu, cuda", "'tpu'")),
], ids=["not-a-device", "no-such-cuda-device", "unsupported-type"])
@pytest.mark.parametrize("command", ["screen", "export", "cleanse"])
def test_bad_device_is_a_usage_error(files, tmp_path, cli, expect_error, command, device, words):
    argv = {"screen": screen_argv(files, tmp_path / "out"),
            "export": ["export", "--model", files / "model.safetensors", "--arch", "small_cnn", "--out",
                       tmp_path / "g.onnx"],
            "cleanse": ["cleanse", "--model", files / "model.safetensors", "--arch", "small_cnn", "--data",
                        files / "data.npz", "--out", tmp_path / "c.safetensors"]}[command]
    argv = [a for a in argv if a != "--device" and a != "cpu"] + ["--device", device]
    expect_error(cli(*argv), 2, *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.safetensors").exists()


def test_bad_device_through_the_real_entry_point(files, tmp_path, cli, expect_error):
    argv = [a for a in screen_argv(files, tmp_path / "out") if a not in ("--device", "cpu")]
    expect_error(cli(*argv, "--device", "gpu", subprocess=True), 2, "--device", "'gpu'")


@pytest.mark.parametrize("available, expected", [(True, "cuda"), (False, "cpu")])
def test_device_defaults_to_the_gpu_when_there_is_one(monkeypatch, available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    parser = build_parser()
    for argv in (["screen", "--model", "m", "--data", "d", "--out", "o"], ["export", "--model", "m"],
                 ["cleanse", "--model", "m", "--arch", "a", "--data", "d", "--out", "o.pt"]):
        args = parser.parse_args(argv)
        assert isinstance(args, argparse.Namespace) and args.device == expected, argv
    help_text = parser._subparsers._group_actions[0].choices["screen"].format_help()
    assert "auto (default: cuda when" in " ".join(help_text.split())
