"""Issue 13, export / cleanse command lines and the CLI safety net: every mistake ends in one clear line
(exit 2 for a command line that cannot work, 1 for bad data, model or file), checked before any work where
it can be; a bug ends in one ``internal error`` line (TROJANGUARD_DEBUG=1 shows the traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import helpers
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trojanguard.cli.demo as demo_command
import trojanguard.cli.info as info_command
from trojanguard.errors import DataError, TrojanGuardError
from trojanguard.guard import write_triton_repository
from trojanguard.guard.onnx_export import check_opset, load_guard_graph
from trojanguard.models import SmallCNN, save_model
from trojanguard.ops import BackendUnavailableError
from trojanguard.ops._backends import Op
from trojanguard.screening.detectors import DetectorOptionError, build_detector

SRC = str(helpers.SRC)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 10-class untrained SmallCNN (weights), an ordinary (unguarded) ONNX classifier, broken .onnx files and
    labelled .npz data (labels inside and outside the model's classes)."""
    folder = tmp_path_factory.mktemp("cli_input")
    torch.manual_seed(0)
    model = SmallCNN().eval()
    save_model(model, folder / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, 3, 32, 32),), str(folder / "plain.onnx"), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    graph = (folder / "plain.onnx").read_bytes()
    (folder / "empty.onnx").write_bytes(b"")
    (folder / "truncated.onnx").write_bytes(graph[: len(graph) // 2])
    (folder / "text.onnx").write_bytes(b"this is not an ONNX graph")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    np.savez(folder / "labelled.npz", x=x, y=np.arange(24) % 10)
    np.savez(folder / "labels20.npz", x=x, y=np.arange(24) % 20)
    (folder / "a-file").write_text("not a folder")
    return folder


def export_args(files, *extra):
    return ["export", "--model", files / "model.safetensors", "--arch", "small_cnn", "--reference",
            files / "labelled.npz", "--threshold", "1", *extra]


def cleanse_args(files, tmp_path, *extra):
    return ["cleanse", "--model", files / "model.safetensors", "--arch", "small_cnn", "--data", files / "labelled.npz",
            "--epochs", "1", "--out", tmp_path / "cleansed.safetensors", *extra]


def screen_args(files, tmp_path, *extra):
    return ["screen", "--model", files / "model.safetensors", "--arch", "small_cnn", "--data", files / "labelled.npz",
            "--out", tmp_path / "screen", "--threshold", "1", *extra]


# ------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("name, words", [
    ("plain.onnx", ("--model", "plain.onnx", "guard graph", "['logits']")),
    ("empty.onnx", ("--model", "empty.onnx", "cannot read")),
    ("truncated.onnx", ("--model", "truncated.onnx", "cannot read")),
    ("text.onnx", ("--model", "text.onnx", "cannot read")),
    ("missing.onnx", ("--model", "missing.onnx", "no such file")),
], ids=["unguarded-classifier", "empty", "truncated", "not-onnx", "missing"])
def test_export_refuses_anything_but_a_guard_graph(cli, expect_error, files, tmp_path, name, words):
    result = cli("export", "--model", files / name, "--triton-repo", tmp_path / "repo")
    expect_error(result, 1, *words)
    assert not (tmp_path / "repo").exists()  # nothing written


def test_export_refuses_an_unguarded_graph_in_a_child_process(cli, expect_error, files, tmp_path):
    result = cli("export", "--model", files / "plain.onnx", "--triton-repo", tmp_path / "repo", subprocess=True)
    expect_error(result, 1, "--model", "guard graph")


def test_guard_graph_api_refuses_ordinary_and_broken_graphs(files, tmp_path):
    with pytest.raises(DataError, match=r"onnx_path: .*expected a trojanguard guard graph.*\['logits'\]"):
        write_triton_repository(files / "plain.onnx", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    with pytest.raises(DataError, match="graph: .*truncated.onnx.*cannot read"):
        load_guard_graph(files / "truncated.onnx", "graph")
    with pytest.raises(DataError, match="graph: .*empty.onnx.*cannot read"):
        load_guard_graph(files / "empty.onnx", "graph")


@pytest.mark.parametrize("extra, words", [
    (("--opset", "3"), ("--opset", "11", "got 3")),
    (("--opset", "99"), ("--opset", "got 99")),
    (("--opset", "seventeen"), ("--opset", "integer", "'seventeen'")),
    (("--triton-repo", "REPO", "--triton-name", "bad name"), ("--triton-name", "'bad name'")),
    (("--triton-repo", "REPO", "--max-batch-size", "0"), ("--max-batch-size", "got 0")),
    (("--device", "gpu"), ("--device", "cpu, cuda", "'gpu'")),
], ids=["opset-too-old", "opset-too-new", "opset-not-a-number", "triton-name", "max-batch-size", "device-name"])
def test_export_options_are_checked_before_any_fitting(cli, expect_error, files, tmp_path, extra, words):
    extra = [tmp_path / "repo" if value == "REPO" else value for value in extra]
    result = cli(*export_args(files, "--out", tmp_path / "guard.onnx", *extra))
    expect_error(result, 2, *words)
    assert not (tmp_path / "guard.onnx").exists() and "guard graph:" not in result.out


def test_export_bad_opset_in_a_child_process(cli, expect_error, files, tmp_path):
    result = cli(*export_args(files, "--out", tmp_path / "guard.onnx", "--opset", "3"), subprocess=True)
    expect_error(result, 2, "--opset", "11")


def test_opset_api():
    assert check_opset(17) == 17
    with pytest.raises(ValueError, match=r"opset: expected an ONNX opset from 11 to \d+, got 3"):
        check_opset(3)


@pytest.mark.parametrize("out, repo, words", [
    ("FOLDER", None, ("--out", "expected a file", "got the folder")),
    ("a-file/guard.onnx", None, ("--out", "a-file", "is a file")),
    ("guard.onnx", "a-file", ("--triton-repo", "expected a folder", "a-file")),
], ids=["out-is-a-folder", "out-inside-a-file", "repo-is-a-file"])
def test_export_outputs_are_checked_before_any_fitting(cli, expect_error, files, tmp_path, out, repo, words):
    out_path = tmp_path if out == "FOLDER" else (files / out if out.startswith("a-file") else tmp_path / out)
    extra = ["--out", out_path] + ([] if repo is None else ["--triton-repo", files / repo])
    result = cli(*export_args(files, *extra))
    expect_error(result, 2, *words)
    assert "guard graph:" not in result.out


@pytest.mark.parametrize("argument", ["--calibration", "--reference"])
def test_export_names_the_missing_data_argument(cli, expect_error, files, tmp_path, argument):
    argv = ["export", "--model", files / "model.safetensors", "--arch", "small_cnn", "--out", tmp_path / "g.onnx",
            "--reference", files / "labelled.npz", "--calibration", files / "labelled.npz"]
    argv[argv.index(argument) + 1] = files / "missing.npz"
    result = cli(*argv)
    line = expect_error(result, 1, argument, "missing.npz")
    assert "error: data:" not in line


# ------------------------------------------------------------------------------------------------ --device


@pytest.mark.parametrize("command", ["screen", "export", "cleanse"])
def test_device_cuda_without_a_gpu_is_one_line(cli, expect_error, files, tmp_path, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = {"screen": screen_args(files, tmp_path), "export": export_args(files, "--out", tmp_path / "g.onnx"),
            "cleanse": cleanse_args(files, tmp_path)}[command]
    result = cli(*argv, "--device", "cuda")
    expect_error(result, 2, f"trojanguard {command}: error: argument --device: CUDA is not available here",
                 "--device cpu")


def test_device_cuda_without_a_gpu_in_a_child_process(cli, expect_error, files, tmp_path):
    result = cli(*cleanse_args(files, tmp_path, "--device", "cuda"), subprocess=True,
                 env={"CUDA_VISIBLE_DEVICES": ""})
    expect_error(result, 2, "--device", "CUDA is not available")
    assert not (tmp_path / "cleansed.safetensors").exists()


# ------------------------------------------------------------------------------------------------ cleanse


@pytest.mark.parametrize("extra, code, words", [
    (("--eval", "labelled.npz", "--attack", "badnets", "--target", "99"), 2, ("--target", "0 … 9", "got 99")),
    (("--eval", "labelled.npz", "--attack", "badnets", "--target", "-1"), 2, ("--target", "got -1")),
    (("--attack", "badnets"), 2, ("--attack", "--eval")),
    (("--target", "3"), 2, ("--target", "--attack")),
    (("--eval", "labels20.npz"), 1, ("--eval", "labels20.npz", "labels 10, 11", "10 classes")),
    (("--out-suffix",), 2, ("--out", ".safetensors")),
    (("--epochs", "0"), 2, ("--epochs", "auto or a positive integer", "'0'")),
    (("--intact-paths", "1.5"), 2, ("--intact-paths", "auto or a share in (0, 1)", "'1.5'")),
], ids=["target-outside-classes", "negative-target", "attack-without-eval", "target-without-attack",
        "eval-labels-outside-classes", "out-suffix", "zero-epochs", "intact-paths-outside"])
def test_cleanse_refuses_before_any_training(cli, expect_error, files, tmp_path, extra, code, words):
    argv = cleanse_args(files, tmp_path)
    if extra == ("--out-suffix",):
        argv[argv.index("--out") + 1], extra = tmp_path / "model.pkl", ()
    extra = [files / value if value.endswith(".npz") else value for value in extra]
    result = cli(*argv, *extra)
    expect_error(result, code, *words)
    assert "cleansing" not in result.err  # stopped before BCU started
    assert not (tmp_path / "cleansed.safetensors").exists()


def test_cleanse_attack_without_eval_in_a_child_process(cli, expect_error, files, tmp_path):
    expect_error(cli(*cleanse_args(files, tmp_path, "--attack", "badnets"), subprocess=True), 2, "--attack", "--eval")


# ------------------------------------------------------------------------------------------------ screen


def test_screen_out_that_is_a_file(cli, expect_error, files, tmp_path):
    argv = screen_args(files, tmp_path)
    argv[argv.index("--out") + 1] = files / "a-file"
    expect_error(cli(*argv), 2, "--out", "expected a folder", "a-file")


@pytest.mark.parametrize("option, words", [
    ("steps=abc", ("steps", "an integer", "'abc'")),
    ("lr=fast", ("lr", "a number", "'fast'")),
    ("mode=3", ("mode", "a string", "got 3")),
    ("stepz=3", ("does not take", "stepz", "steps")),
])
def test_screen_detector_option_values_are_named(cli, expect_error, files, tmp_path, option, words):
    expect_error(cli(*screen_args(files, tmp_path, "--detector", "cd", "--detector-option", option)), 1, *words)


def test_screen_options_of_the_default_ensemble_are_named(cli, expect_error, files, tmp_path):
    expect_error(cli(*screen_args(files, tmp_path, "--detector-option", "fusion=vote")), 1, "fusion", "vote")
    expect_error(cli(*screen_args(files, tmp_path, "--detector-option", "lr=0.1")), 1, "does not take", "lr",
                 "member_options")


def test_detector_option_api():
    model = SmallCNN()
    with pytest.raises(DetectorOptionError, match="steps expects an integer, got 'abc'"):
        build_detector("cd", model, {"steps": "abc"})
    with pytest.raises(DetectorOptionError, match="support_fraction expects a number, got True"):
        build_detector("features", model, {"support_fraction": True})
    detector, _ = build_detector("cd", model, {"steps": 3, "lr": 0.1, "early_stop": None, "compile": "max"})
    assert detector.steps == 3


@settings(max_examples=40, deadline=None)
@given(value=st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=5)))
def test_detector_option_values_are_accepted_or_named(value):
    """Whatever JSON value --detector-option steps=... decodes to: a detector, or an error naming steps."""
    try:
        build_detector("cd", SmallCNN(), {"steps": value})
    except TrojanGuardError as exc:
        assert "steps" in str(exc)
    except ValueError as exc:  # the detector's own range check (steps < 1)
        assert "steps" in str(exc) and isinstance(value, int) and value < 1


def test_unavailable_backend_is_one_line(cli, expect_error, files, tmp_path, monkeypatch):
    """TROJANGUARD_BACKEND=triton on CPU tensors cannot run anywhere (without TRITON_INTERPRET)."""
    monkeypatch.setenv("TROJANGUARD_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = cli(*screen_args(files, tmp_path, "--detector", "cd", "--detector-option", "steps=2"))
    expect_error(result, 1, "TROJANGUARD_BACKEND", "'triton'", "mask_step")


def test_backend_unavailable_error_is_a_trojanguard_and_runtime_error():
    assert issubclass(BackendUnavailableError, TrojanGuardError) and issubclass(BackendUnavailableError, RuntimeError)
    probe = Op("probe", lambda x: x)  # only the reference: every other backend is refused
    with pytest.raises(BackendUnavailableError, match="backend: 'cuda' cannot run op probe here"):
        probe.select("cuda", torch.zeros(1))


# ------------------------------------------------------------------------------------------------ safety net


def _raiser(exc):
    def command(args):
        raise exc
    return command


@pytest.mark.parametrize("exc, code, words", [
    (RuntimeError("boom\n  on two lines"), 1,
     ("trojanguard info: internal error: RuntimeError: boom on two lines", "TROJANGUARD_DEBUG=1", "report")),
    (DataError("x: expected a thing, got another"), 1, ("trojanguard info: error: x: expected a thing",)),
    (FileNotFoundError(2, "No such file or directory", "/nowhere/file.npz"), 1,
     ("error: '/nowhere/file.npz': No such file or directory",)),
    (OSError(28, "No space left on device"), 1, ("error: No space left on device",)),
], ids=["bug", "trojanguard-error", "os-error-with-file", "os-error-without-file"])
def test_every_escaping_exception_is_one_line(cli, expect_error, monkeypatch, exc, code, words):
    monkeypatch.delenv("TROJANGUARD_DEBUG", raising=False)
    monkeypatch.setattr(info_command, "run", _raiser(exc))
    line = expect_error(cli("info"), code, *words)
    assert "[Errno" not in line


def test_os_error_names_the_argument_that_holds_the_file(cli, expect_error, monkeypatch, tmp_path):
    monkeypatch.setattr(demo_command, "run", _raiser(PermissionError(13, "Permission denied",
                                                                        str(tmp_path / "demo" / "guard.onnx"))))
    expect_error(cli("demo", "--out", tmp_path / "demo"), 1, "--out", "guard.onnx", "Permission denied")


def test_debug_variable_reraises_a_bug(cli, monkeypatch):
    monkeypatch.setenv("TROJANGUARD_DEBUG", "1")
    monkeypatch.setattr(info_command, "run", _raiser(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cli("info")


def test_keyboard_interrupt_exits_130(cli, monkeypatch):
    monkeypatch.setattr(info_command, "run", _raiser(KeyboardInterrupt()))
    result = cli("info")
    assert result.code == 130 and "Traceback" not in result.err
    expected = "trojanguard info: interrupted (finished work is kept; run the same command again to resume where it can)"
    assert result.err.strip().splitlines() == [expected]


@pytest.mark.parametrize("debug", [False, True])
def test_bug_in_a_child_process(cli, expect_error, debug):
    result_class = sys.modules[cli.__module__].CliResult  # the harness's result type
    code = ("import sys, trojanguard.cli as c, trojanguard.cli.info as info_command\n"
            "def boom(args): raise RuntimeError('boom')\n"
            "info_command.run = boom\n"
            "sys.exit(c.main(['info']))\n")
    env = {k: v for k, v in os.environ.items() if k != "TROJANGUARD_DEBUG"}
    env.update(PYTHONPATH=SRC, **({"TROJANGUARD_DEBUG": "1"} if debug else {}))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    if debug:
        assert done.returncode == 1 and "Traceback" in done.stderr and "RuntimeError: boom" in done.stderr
    else:
        expect_error(result_class(done.returncode, done.stdout, done.stderr), 1, "internal error: RuntimeError: boom")


@pytest.mark.parametrize("exc, code", [(KeyboardInterrupt(), 130), (RuntimeError("boom"), 1)],
                         ids=["interrupted", "bug"])
def test_screen_keeps_finished_rows_when_stopped(cli, files, tmp_path, monkeypatch, exc, code):
    """A screen stopped on its third batch keeps the two finished batches in results.csv."""
    from trojanguard.screening.detectors import OnePassScorer

    calls = {"n": 0}
    original = OnePassScorer.__call__

    def stop_on_third(self, x, first_index):
        calls["n"] += 1
        if calls["n"] == 3:
            raise exc
        return original(self, x, first_index)

    monkeypatch.delenv("TROJANGUARD_DEBUG", raising=False)
    monkeypatch.setattr(OnePassScorer, "__call__", stop_on_third)
    result = cli(*screen_args(files, tmp_path, "--detector", "features", "--batch-size", "8", "--no-report"))
    assert result.code == code and "Traceback" not in result.err, result.err
    lines = (tmp_path / "screen" / "results.csv").read_text().strip().splitlines()
    assert sum(line[:1].isdigit() for line in lines) == 2 * 8  # the two finished batches


def test_export_prints_the_fit_sample_size_warnings_as_cli_lines(cli, files, tmp_path):
    """24 reference images are too few for the features fit: export says so in its own lines (and goes on), not as
    Python warnings with source lines."""
    result = cli(*export_args(files, "--out", tmp_path / "g.onnx"), subprocess=True)
    assert result.code == 0, result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert any(line.startswith("trojanguard export: warning: reference_data:") for line in lines), result.err
    assert "SampleSizeWarning" not in result.err and "warnings.warn" not in result.err, result.err
    assert (tmp_path / "g.onnx").is_file()
