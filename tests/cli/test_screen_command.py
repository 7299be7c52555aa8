"""``trojanguard screen`` and ``trojanguard export`` on the command line: a screening subprocess really killed
(SIGKILL) mid-run resumes to exactly the result of an uninterrupted run; bad inputs give clear errors; the
export writes a Triton model repository. Tiny data, an untrained small CNN and CD with a few steps."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch

from trojanguard.cli import main
from trojanguard.models import build_model, save_model
from trojanguard.screening.records import ResultsFile

SRC = str(helpers.SRC)
BATCH = 6
IMAGES = 36  # 6 batches


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-screen")
    torch.manual_seed(0)
    save_model(build_model("small_cnn", num_classes=4).eval(), root / "model.safetensors")
    generator = torch.Generator().manual_seed(3)
    x = (torch.rand(IMAGES, 16, 16, 3, generator=generator) * 255).round().to(torch.uint8)
    np.savez(root / "data.npz", x=x.numpy(), y=(torch.arange(IMAGES) % 4).numpy())
    np.savez(root / "clean.npz", x=torch.rand(12, 3, 16, 16, generator=generator).numpy())
    return root


def screen_command(files, out, *extra):
    return [sys.executable, "-m", "trojanguard", "screen", "--model", str(files / "model.safetensors"),
            "--arch", "small_cnn", "--num-classes", "4", "--data", str(files / "data.npz"), "--detector", "cd",
            "--steps", "3", "--batch-size", str(BATCH), "--calibration", str(files / "clean.npz"), "--fpr", "0.1",
            "--top-k", "4", "--out", str(out), *extra]


def run(command, env=None, **kwargs):
    environment = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   "TROJANGUARD_PROGRESS": "0", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, check=False, **kwargs)


def data_rows(path):
    return len(ResultsFile(path).read()[1])


def same_results(a: Path, b: Path) -> None:
    """Every row (ids, labels, predictions, scores to the last bit, flags) and the threshold are equal."""
    meta_a, rows_a = ResultsFile(a).read()
    meta_b, rows_b = ResultsFile(b).read()
    assert meta_a["threshold"] == meta_b["threshold"] and meta_a["run"] == meta_b["run"]
    assert rows_a.ids == rows_b.ids and rows_a.labels == rows_b.labels
    np.testing.assert_array_equal(rows_a.scores, rows_b.scores)
    np.testing.assert_array_equal(rows_a.predicted, rows_b.predicted)
    np.testing.assert_array_equal(rows_a.flagged, rows_b.flagged)


@pytest.fixture(scope="module")
def uninterrupted(files):
    out = files / "uninterrupted"
    done = run(screen_command(files, out))
    assert done.returncode == 0, done.stderr
    return out


# The CLI in a child process whose results file SIGKILLs the process right after its N-th durable append (no
# cleanup runs): the hook lives here, in the test, not in the library.
KILL_AFTER_APPENDS = """
import os, signal, sys
from trojanguard.cli import main
from trojanguard.screening.records import ResultsFile
append, appends = ResultsFile.append, []
def append_then_kill(self, *args, **kwargs):
    append(self, *args, **kwargs)
    appends.append(1)
    if len(appends) >= {after}:
        os.kill(os.getpid(), signal.SIGKILL)
ResultsFile.append = append_then_kill
sys.exit(main(sys.argv[1:]))
"""


def killed_after(command: list[str], appends: int) -> list[str]:
    """``command`` (``python -m trojanguard ...``) run so that it is SIGKILLed after ``appends`` batches."""
    assert command[1:3] == ["-m", "trojanguard"], command
    return [command[0], "-c", KILL_AFTER_APPENDS.format(after=appends), *command[3:]]


def test_killed_after_two_batches_resumes_to_the_uninterrupted_result(files, uninterrupted):
    """The run is SIGKILLed right after its 2nd batch is durable: no cleanup runs."""
    out = files / "killed-hook"
    killed = run(killed_after(screen_command(files, out), 2))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert data_rows(out / "results.csv") == 2 * BATCH
    assert not (out / "index.html").exists()
    resumed = run(screen_command(files, out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at sample {2 * BATCH}" in resumed.stdout
    same_results(out / "results.csv", uninterrupted / "results.csv")
    assert (out / "index.html").stat().st_size > 0


def test_killed_from_outside_mid_run_resumes_to_the_uninterrupted_result(files, uninterrupted):
    """SIGKILL sent by the test as soon as the results file has rows, wherever the run is."""
    out = files / "killed-outside"
    environment = {**os.environ, "PYTHONPATH": SRC, "TROJANGUARD_PROGRESS": "0"}
    process = subprocess.Popen(screen_command(files, out), env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.csv"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if results.exists() and data_rows(results) >= BATCH:
                break
            time.sleep(0.02)
        if process.poll() is not None:
            pytest.skip("the run finished before it could be killed (machine much faster than planned)")
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    left = data_rows(results)
    assert BATCH <= left < IMAGES
    resumed = run(screen_command(files, out))
    assert resumed.returncode == 0, resumed.stderr
    same_results(results, uninterrupted / "results.csv")


def test_screen_cli_reports_and_refuses_mixing_runs(files, uninterrupted, capsys):
    done = run(screen_command(files, uninterrupted))  # complete already: reads back, rewrites the report
    assert done.returncode == 0 and "nothing left to screen" in done.stdout
    assert "report:" in done.stdout and (uninterrupted / "index.html").is_file()
    assert main(screen_command(files, uninterrupted, "--steps", "4")[3:]) == 1
    err = capsys.readouterr().err
    assert "different run" in err and "detector" in err and "--restart" in err


@pytest.mark.parametrize("change, message", [
    ({"--data": "missing.npz"}, "neither an existing file or folder"),
    ({"--data": "gray.npz"}, "model: cannot take the data's images of shape (1, 16, 16)"),
    ({"--arch": "resnet18_cifar"}, "does not fit architecture 'resnet18_cifar'"),
    ({"--model": "missing.safetensors"}, "does not exist"),
    ({"--calibration": "corrupt.npz"}, "cannot be read"),
], ids=["missing-data", "model-does-not-fit-data", "wrong-arch", "missing-model", "corrupt-npz"])
def test_screen_cli_bad_inputs(files, tmp_path, capsys, change, message):
    np.savez(files / "gray.npz", x=torch.rand(4, 1, 16, 16).numpy())
    (files / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    argv = screen_command(files, tmp_path / "out")[3:]
    for key, value in change.items():
        is_file = key in ("--data", "--model", "--calibration")
        argv[argv.index(key) + 1] = str(files / value) if is_file else value
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("trojanguard screen: error:") and message in err, err


def test_export_cli_writes_a_valid_triton_repository(files, tmp_path, capsys):
    from trojanguard.guard import check_triton_repository, read_metadata

    np.savez(files / "reference.npz", x=torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(4)).numpy())
    argv = ["export", "--model", str(files / "model.safetensors"), "--arch", "small_cnn", "--num-classes", "4",
            "--reference", str(files / "reference.npz"), "--calibration", str(files / "clean.npz"), "--fpr", "0.1",
            "--out", str(tmp_path / "guard.onnx"), "--triton-repo", str(tmp_path / "repo"), "--max-batch-size", "16"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "tritonserver --model-repository" in out
    config = check_triton_repository(tmp_path / "repo")
    assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
    assert (tmp_path / "repo" / "trojanguard_guard" / "1" / "model.onnx").read_bytes() == \
        (tmp_path / "guard.onnx").read_bytes()
    assert read_metadata(tmp_path / "guard.onnx")["input_shape"] == [3, 16, 16]
    # an exported graph alone: only the repository is written
    assert main(["export", "--model", str(tmp_path / "guard.onnx"), "--triton-repo", str(tmp_path / "repo2"),
                 "--triton-name", "guard2", "--instance-kind", "cpu"]) == 0
    assert check_triton_repository(tmp_path / "repo2", "guard2").instance_group[0].kind == 2  # KIND_CPU
    assert main(["export", "--model", str(files / "model.safetensors"), "--arch", "small_cnn"]) == 2
    assert main(["export", "--model", str(files / "model.safetensors"), "--arch", "small_cnn", "--num-classes", "4",
                 "--out", str(tmp_path / "g.onnx")]) == 2  # a command line that cannot work: usage error
    assert "--reference" in capsys.readouterr().err


def test_export_cli_writes_a_python_backend_repository_with_a_production_pipeline(files, tmp_path, capsys):
    """--triton-backend python --production-model: the guard, the production model (exported from its weights)
    and the pipeline, each valid against Triton's schema; usage errors name the option."""
    from trojanguard.guard import check_triton_repository

    np.savez(files / "reference.npz", x=torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(4)).numpy())
    common = ["--reference", str(files / "reference.npz"), "--calibration", str(files / "clean.npz"), "--fpr", "0.1"]
    model = ["--model", str(files / "model.safetensors"), "--arch", "small_cnn", "--num-classes", "4"]
    argv = ["export", *model, *common, "--triton-repo", str(tmp_path / "repo"), "--triton-backend", "python",
            "--production-model", str(files / "model.safetensors"), "--policy", "reject", "--pipeline", "bls"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "trojanguard_guard_pipeline" in capsys.readouterr().out
    for name in ("trojanguard_guard", "trojanguard_guard_production", "trojanguard_guard_pipeline"):
        config = check_triton_repository(tmp_path / "repo", name)
        assert config.backend == "python" and (tmp_path / "repo" / name / "1" / "model.py").is_file()
    pipeline = check_triton_repository(tmp_path / "repo", "trojanguard_guard_pipeline")
    assert pipeline.parameters["policy"].string_value == "reject"
    assert pipeline.parameters["pipeline_mode"].string_value == "bls"
    assert [o.name for o in pipeline.output] == ["logits", "score", "flagged"]
    # an .onnx production model of another input shape: refused, naming the option
    plain = tmp_path / "other.onnx"
    from trojanguard.guard.onnx_export import export_model_onnx

    export_model_onnx(build_model("small_cnn", num_classes=4).eval(), plain, torch.rand(2, 3, 20, 20))
    argv = ["export", *model, *common, "--triton-repo", str(tmp_path / "repo2"), "--production-model", str(plain)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--production-model" in err and "[3, 16, 16]" in err and "[3, 20, 20]" in err, err
    assert main(["export", *model, *common, "--out", str(tmp_path / "g.onnx"), "--production-model",
                 str(plain)]) == 2  # a production model needs a repository to be served from
    assert "--triton-repo" in capsys.readouterr().err


def test_engine_options_are_checked_before_any_work(files, tmp_path, capsys, monkeypatch):
    """--engine ray's options are usage errors with --engine local; without Ray installed, --engine ray says how
    to install it (one line, exit 1) — nothing is written in either case."""
    base = ["screen", "--model", str(files / "model.safetensors"), "--arch", "small_cnn", "--num-classes", "4",
            "--data", str(files / "data.npz"), "--detector", "features", "--out", str(tmp_path / "run")]
    for extra, needle in ((["--workers", "2"], "--workers: an option of --engine ray"),
                          (["--gpus-per-worker", "0.5"], "--gpus-per-worker: an option of --engine ray"),
                          (["--engine", "ray", "--workers", "0"], "--workers: expected a positive integer"),
                          (["--engine", "ray", "--block-size", "100"], "--block-size: expected a multiple of")):
        assert main(base + extra) == 2
        assert needle in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: import ray fails
    assert main(base + ["--engine", "ray"]) == 1
    err = capsys.readouterr().err
    assert "needs Ray Data" in err and "pip install 'trojanguard[ray]'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
