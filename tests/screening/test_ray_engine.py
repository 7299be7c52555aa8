"""screen(..., engine="ray") on a local Ray cluster started by the tests (2 CPUs, loopback only): the same rows
as the local engine for cd and features on the zoo's poisoned set; a worker killed mid-run and a driver killed
mid-run both end in the rows of an uninterrupted run; committed blocks are skipped on resume; bad input and
options are refused as locally. Skipped, with the reason, where Ray Data is not installed."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trojanguard.detect.feature_mahalanobis import single_thread as one_thread  # as each Ray actor runs
from trojanguard.screening import screen
from trojanguard.screening.ray_engine import BLOCKS_DIR, RayOptions
from trojanguard.screening.records import ResultsFile

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'trojanguard[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'trojanguard[ray]')")

SAMPLES = 256  # of the zoo's poisoned training set (its first images hold poisoned ones: truth known)
BATCH = 32
WORKER_TITLE = b"MapBatches(_BlockScorer)"  # in the command line of Ray's scoring actors


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def zoo_data():
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    entry = get_backdoored_model(ZooConfig(attack="badnets"), show_progress=False)
    x = entry.train.dataset.x[:SAMPLES]
    return entry.model, x


@pytest.fixture(scope="module")
def local_cd_rows(zoo_data, tmp_path_factory):
    """The local engine's rows for cd (15 steps) on the zoo images: what every interrupted Ray run must end in."""
    model, x = zoo_data
    out = tmp_path_factory.mktemp("local-cd")
    local_run(model, x, out, "cd", {"steps": 15})
    return rows_of(out)


def rows_of(out_dir: Path):
    """The rows of a finished run's results.csv (the header's creation time aside)."""
    _, rows = ResultsFile(Path(out_dir) / "results.csv").read()
    return rows


def assert_same_rows(a, b) -> None:
    assert a.ids == b.ids and a.labels == b.labels and a.errors == b.errors
    np.testing.assert_array_equal(a.predicted, b.predicted)
    np.testing.assert_array_equal(a.flagged, b.flagged)
    np.testing.assert_array_equal(a.scores, b.scores)  # bit for bit: the same batches, one thread each


def local_run(model, x, out_dir, detector, options=None):
    with one_thread():
        return screen(model, x, detector=detector, out_dir=out_dir, calibration=None, batch_size=BATCH,
                      detector_options=options, report=False, show_progress=False)


def test_ray_rows_equal_the_local_engine(cluster, zoo_data, tmp_path):
    """features here; cd in the worker-kill test below (its rows are compared with the local engine's too)."""
    model, x = zoo_data
    detector, options = "features", None
    local = local_run(model, x, tmp_path / "local", detector, options)
    result = screen(model, x, detector=detector, out_dir=tmp_path / "ray", calibration=None, batch_size=BATCH,
                    detector_options=options, report=False, show_progress=False, engine="ray",
                    ray={"workers": 2, "block_size": 2 * BATCH})
    assert_same_rows(rows_of(tmp_path / "local"), rows_of(tmp_path / "ray"))
    assert result.threshold == local.threshold and result.flagged.sum() == local.flagged.sum()
    run = result.summary["run"]
    assert run["engine"] == "ray" and run["blocks"] == SAMPLES // (2 * BATCH) and run["workers"] == 2
    assert len(list((tmp_path / "ray" / BLOCKS_DIR).glob("rows-*.csv"))) == run["blocks"]


def _kill_a_worker_after_the_first_block(out_dir: Path, killed: list) -> None:
    """Wait until a block is committed, then SIGKILL one scoring actor's process (found by its command line)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out_dir / BLOCKS_DIR).glob("rows-*.csv")):
        time.sleep(0.05)
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if WORKER_TITLE in command:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds Ray's worker processes in /proc")
def test_a_worker_killed_mid_run_ends_in_the_same_rows(cluster, zoo_data, local_cd_rows, tmp_path):
    model, x = zoo_data
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_the_first_block, args=(tmp_path / "ray", killed))
    killer.start()
    screen(model, x, detector="cd", detector_options={"steps": 15}, out_dir=tmp_path / "ray", calibration=None,
           batch_size=BATCH, report=False, show_progress=False, engine="ray",
           ray=RayOptions(workers=2, block_size=BATCH))
    killer.join()
    assert killed, "no scoring worker was found to kill"
    assert_same_rows(local_cd_rows, rows_of(tmp_path / "ray"))


DRIVER = textwrap.dedent("""
    import sys, torch
    from trojanguard.screening import screen
    from trojanguard.zoo import ZooConfig, get_backdoored_model
    entry = get_backdoored_model(ZooConfig(attack="badnets"), show_progress=False)
    screen(entry.model, entry.train.dataset.x[:{samples}], detector="cd", detector_options={{"steps": 15}},
           out_dir=sys.argv[1], calibration=None, batch_size={batch}, report=False, show_progress=False,
           engine="ray", ray={{"workers": 1, "block_size": {batch}, "address": sys.argv[2]}})
""")


def test_a_driver_killed_mid_run_resumes_to_the_same_rows(cluster, zoo_data, local_cd_rows, tmp_path):
    model, x = zoo_data
    out = tmp_path / "ray"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(samples=SAMPLES, batch=BATCH), encoding="utf-8")
    address = ray.get_runtime_context().gcs_address  # the driver joins the running cluster, which outlives it
    driver = subprocess.Popen([sys.executable, str(script), str(out), address], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(list((out / BLOCKS_DIR).glob("rows-*.csv"))) < 2:
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # the driver (its actors end with its job; the cluster stays)
        driver.wait()
    committed = len(list((out / BLOCKS_DIR).glob("rows-*.csv")))
    assert 2 <= committed < SAMPLES // BATCH, "the driver finished before it could be killed mid-run"
    result = screen(model, x, detector="cd", detector_options={"steps": 15}, out_dir=out, calibration=None,
                    batch_size=BATCH, report=False, show_progress=False, engine="ray",
                    ray={"workers": 2, "block_size": 4 * BATCH})  # a new block size: the recorded one is kept
    assert result.summary["run"]["blocks_committed_before"] == committed
    assert result.summary["run"]["block_size"] == BATCH
    assert_same_rows(local_cd_rows, rows_of(out))


def test_bad_input_and_options_are_refused_as_locally(cluster, zoo_data, tmp_path):
    model, x = zoo_data
    with pytest.raises(ValueError, match="engine: expected one of"):
        screen(model, x, out_dir=tmp_path / "a", engine="spark")
    with pytest.raises(ValueError, match="block_size: expected a multiple of batch_size=32"):
        screen(model, x, detector="features", out_dir=tmp_path / "b", calibration=None, batch_size=BATCH,
               engine="ray", ray={"block_size": 48}, show_progress=False, report=False)
    with pytest.raises(ValueError, match="workers: expected a positive integer"):
        screen(model, x, out_dir=tmp_path / "c", engine="ray", ray={"workers": 0})
    with pytest.raises(ValueError, match="ray: options for engine='ray'"):
        screen(model, x, out_dir=tmp_path / "d", ray={"workers": 2})
    from trojanguard.errors import DataError

    with pytest.raises(DataError, match="model: cannot take the data's images"):
        screen(model, torch.rand(8, 1, 7, 7), detector="features", out_dir=tmp_path / "e", calibration=None,
               engine="ray", show_progress=False, report=False)


def test_folder_and_npz_sources_with_unreadable_files_give_the_local_rows(cluster, zoo_data, tmp_path):
    """Actors read their own blocks from the paths (an .npz, a folder with a corrupt and an empty image); the rows,
    unreadable ones with their errors, equal the local engine's."""
    from PIL import Image

    model, x = zoo_data
    pixels = (x[:40].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    np.savez(tmp_path / "data.npz", x=pixels)
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    for i, image in enumerate(pixels[:30]):
        Image.fromarray(image).save(folder / "a" / f"{i:03d}.png")
    (folder / "a" / "010.png").write_bytes(b"not a png")
    (folder / "a" / "020.png").write_bytes(b"")
    for name, data in (("npz", tmp_path / "data.npz"), ("folder", folder)):
        options = {"detector": "features", "calibration": None, "batch_size": 8, "report": False,
                   "show_progress": False, "reference": x[:200]}
        with one_thread():
            screen(model, data, out_dir=tmp_path / f"{name}-local", **options)
        screen(model, data, out_dir=tmp_path / f"{name}-ray", engine="ray", ray={"workers": 2, "block_size": 16},
               **options)
        local, remote = rows_of(tmp_path / f"{name}-local"), rows_of(tmp_path / f"{name}-ray")
        assert_same_rows(local, remote)
        if name == "folder":
            assert sum(bool(e) for e in remote.errors) == 2 and remote.errors[10] and remote.errors[20]
