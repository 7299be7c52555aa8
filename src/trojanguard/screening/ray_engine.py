"""Screening on Ray Data (``screen(..., engine="ray")``, CLI ``--engine ray``): the same detectors, rows and report
as the local engine, scored by a pool of actors on one machine or a cluster.

How a run goes:
- The driver fits the detector as locally (on a sample or a reference set) and calibrates the threshold; the fitted
  scorer and the source (paths for folders and ``.npz``: each actor reads only its own samples) are put in Ray's
  object store once and every actor holds them.
- The samples are cut into **blocks** of whole batches (``block_size``, a multiple of ``batch_size``; a block's
  batches start where the local engine's do, so its rows are computed on the same batches). A Ray dataset of block
  descriptions runs through ``map_batches`` on an actor pool (``workers`` actors, ``gpus_per_worker`` GPUs each).
- Each finished block is **committed atomically** by the driver to ``OUT/blocks/rows-<start>-<stop>.csv``
  (temporary file, fsync, rename): a killed driver or worker loses at most the blocks in flight, and a re-run
  skips the committed ones. Ray restarts a killed actor and retries its block.
- When every block is committed, their rows are appended to ``results.csv`` in index order, and the run ends as a
  local one does (threshold, flags, report), so the final files equal an uninterrupted run's row for row.

Block files are the driver's only: workers need no shared file system, only the data paths (a folder or ``.npz``
visible at the same path on every node, or in-memory data shipped through the object store).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from trojanguard.errors import TrojanGuardError, check_positive_int
from trojanguard.progress import progress_bar
from trojanguard.screening.records import ResumeError, escape_cell, unescape_cell, write_atomic, write_row

BLOCKS_DIR = "blocks"
BLOCK_COLUMNS = ("index", "id", "label", "predicted", "score", "error")  # a block file; flags come at the end
LAYOUT_FILE = "layout.json"
INSTALL_HINT = "pip install 'trojanguard[ray]' (Ray Data: ray[data])"
DEFAULT_BATCHES_PER_BLOCK = 4


class EngineUnavailableError(TrojanGuardError, ValueError):
    """The requested engine cannot run here (Ray not installed, or no cluster at the address)."""


class EngineError(TrojanGuardError, RuntimeError):
    """The engine failed during the run (the blocks committed so far are kept)."""


@dataclass(frozen=True)
class RayOptions:
    """How ``engine="ray"`` runs.

    Attributes:
        address: the cluster (``"auto"``: the one this machine belongs to; ``"ray://HOST:PORT"``: a remote one
            through Ray Client); None: the running one, else a local cluster started for the run.
        workers: actors scoring blocks (None: one per CPU of the cluster, at most one per block).
        gpus_per_worker: GPUs per actor (fractions share a GPU); 0: CPU actors.
        block_size: samples per committed block, a multiple of the batch size (None: 4 batches).
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    block_size: int | None = None

    def check(self, batch_size: int | None = None) -> None:
        """ValueError naming the first option that cannot work (``batch_size``: the run's, for ``block_size``)."""
        if self.workers is not None:
            check_positive_int("workers", self.workers)
        if not (isinstance(self.gpus_per_worker, (int, float)) and math.isfinite(self.gpus_per_worker)
                and self.gpus_per_worker >= 0):
            raise ValueError(f"gpus_per_worker: expected a number >= 0, got {self.gpus_per_worker!r}")
        if self.block_size is not None:
            check_positive_int("block_size", self.block_size)
            if batch_size is not None and self.block_size % batch_size:
                raise ValueError(f"block_size: expected a multiple of batch_size={batch_size} (blocks hold whole "
                                 f"batches, as the local engine scores them), got {self.block_size}")


def require_ray():
    """The ``ray`` module with Ray Data, or EngineUnavailableError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise EngineUnavailableError(f"engine: 'ray' needs Ray Data, which is not installed here ({exc.name}); "
                                     f"{INSTALL_HINT}") from None
    return ray


def block_ranges(samples: int, block_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every block: whole batches of the run, the last one shorter."""
    return [(start, min(start + block_size, samples)) for start in range(0, samples, block_size)]


def block_path(folder: Path, start: int, stop: int) -> Path:
    return folder / f"rows-{start:012d}-{stop:012d}.csv"


class _BlockScorer:
    """A Ray actor: holds the fitted scorer and the source, scores the blocks it is given."""

    def __init__(self, scorer_ref, source_ref, batch_size: int, detector_name: str, threads: int | None):
        import ray
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.scorer = ray.get(scorer_ref) if isinstance(scorer_ref, ray.ObjectRef) else scorer_ref
        self.source = ray.get(source_ref) if isinstance(source_ref, ray.ObjectRef) else source_ref
        self.batch_size, self.detector_name = batch_size, detector_name
        if ray.get_gpu_ids() and torch.cuda.is_available():  # a GPU actor: the scorer moves to its GPU
            _move_scorer(self.scorer, torch.device("cuda"))

    def __call__(self, blocks: dict) -> dict:
        import numpy as np

        from trojanguard.screening.api import score_batch

        out = {"block": [], "index": [], "id": [], "label": [], "predicted": [], "score": [], "error": []}
        for block, start, stop in zip(blocks["block"], blocks["start"], blocks["stop"]):
            for batch in self.source.batches(self.batch_size, start=int(start), stop=int(stop)):
                predicted, scores, errors = score_batch(self.scorer, batch, self.detector_name)
                out["block"] += [int(block)] * len(batch)
                out["index"] += list(range(batch.start, batch.start + len(batch)))
                out["id"] += batch.ids
                out["label"] += batch.labels
                out["predicted"] += predicted
                out["score"] += scores
                out["error"] += errors
        return {"block": np.array(out["block"], dtype=np.int64), "index": np.array(out["index"], dtype=np.int64),
                "id": np.array(out["id"], dtype=object), "label": np.array(out["label"], dtype=object),
                "predicted": np.array(out["predicted"], dtype=np.int64),
                "score": np.array(out["score"], dtype=np.float64), "error": np.array(out["error"], dtype=object)}


def stream_ray(scorer, source, results, done: int, batch_size: int, threshold, detector_name: str,
               show_progress: bool, options: RayOptions, out_dir: Path) -> dict:
    """Score samples ``done …`` on Ray (see the module docstring) and append their rows to ``results``; returns
    what the summary reports about the engine (workers, blocks scored now and skipped)."""
    ray = require_ray()
    folder = out_dir / BLOCKS_DIR
    source = _with_absolute_paths(source)  # actors do not share the driver's working directory
    block_size = _block_size(folder, options, batch_size)
    blocks = [(k, start, stop) for k, (start, stop) in enumerate(block_ranges(len(source), block_size)) if stop > done]
    pending = [b for b in blocks if not block_path(folder, b[1], b[2]).is_file()]
    info = {"engine": "ray", "block_size": block_size, "blocks": len(blocks), "blocks_committed_before":
            len(blocks) - len(pending), "workers": 0, "address": options.address}
    if pending:  # all committed (a driver killed while writing results.csv): no cluster needed
        started_here = _connect(ray, options.address)
        try:
            info["workers"] = _run_blocks(ray, scorer, source, pending, folder, batch_size, detector_name,
                                          show_progress, options)
        finally:
            if started_here:
                ray.shutdown()
    for _, start, stop in blocks:  # every block is committed now: into results.csv, in index order
        path = block_path(folder, start, stop)
        rows = [row for row in _read_block(path) if row[0] >= done]
        if [row[0] for row in rows] != list(range(max(start, done), stop)):
            raise ResumeError(f"{path}: expected the rows {max(start, done)}…{stop - 1}, got "
                              f"{len(rows)} rows; the file was changed by hand? pass overwrite=True (CLI: --restart)")
        index, ids, labels, predicted, scores, errors = (list(column) for column in zip(*rows))
        flags = [None] * len(rows) if threshold is None else [int(s > threshold) for s in scores]
        results.append(index[0], ids, labels, predicted, scores, flags, errors)
    return info


def _move_scorer(scorer, device) -> None:
    """Move the modules and tensors a scorer and its detector hold to ``device`` (a GPU actor)."""
    import torch

    for owner in (scorer, scorer.detector):
        for name, value in list(vars(owner).items()):
            if isinstance(value, (torch.nn.Module, torch.Tensor)):
                setattr(owner, name, value.to(device))
    scorer.device = device


def clear_blocks(out_dir: Path) -> None:
    """Remove the committed blocks of an earlier run (a new run starts in this folder)."""
    folder = out_dir / BLOCKS_DIR
    if folder.is_dir():
        for entry in folder.iterdir():
            entry.unlink()
        folder.rmdir()


def _block_size(folder: Path, options: RayOptions, batch_size: int) -> int:
    """The run's block size: the one its committed blocks were cut with (kept on resume), else the option's."""
    layout = folder / LAYOUT_FILE
    if layout.is_file():
        try:
            recorded = json.loads(layout.read_text(encoding="utf-8"))
        except ValueError:
            recorded = {}
        if recorded.get("batch_size") == batch_size:
            return int(recorded["block_size"])
        clear_blocks(folder.parent)  # cut with another batch size: their batches are not this run's
    options.check(batch_size)
    size = options.block_size or DEFAULT_BATCHES_PER_BLOCK * batch_size
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(layout, json.dumps({"block_size": size, "batch_size": batch_size}) + "\n")
    return size


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at ``address`` (None: the running one, else a new local one); True when started here."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise EngineUnavailableError(f"address: no Ray cluster reachable at {address!r} "
                                     f"({' '.join(str(exc).split())[:200]})") from None
    return True


def _run_blocks(ray, scorer, source, pending, folder: Path, batch_size: int, detector_name: str,
                show_progress: bool, options: RayOptions) -> int:
    """Score the pending blocks on an actor pool, committing each as soon as all its rows are back."""
    import numpy as np

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours below counts images, on a terminal or in a log
    resources = ray.cluster_resources()
    fits = (int(resources.get("GPU", 0) / options.gpus_per_worker) if options.gpus_per_worker
            else int(resources.get("CPU", 1)))
    workers = max(1, min(options.workers or fits, len(pending)))
    scorer_ref, source_ref = ray.put(_portable_scorer(scorer)), ray.put(source)
    items = [{"block": k, "start": start, "stop": stop} for k, start, stop in pending]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    resources = {"num_gpus": options.gpus_per_worker} if options.gpus_per_worker else {"num_cpus": 1}
    scored = dataset.map_batches(
        _BlockScorer, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_args=(scorer_ref, source_ref, batch_size, detector_name,
                             None if options.gpus_per_worker else 1), **resources)
    expected = {k: stop - start for k, start, stop in pending}
    ranges = {k: (start, stop) for k, start, stop in pending}
    partial: dict[int, list] = {}
    bar = progress_bar(sum(expected.values()), desc=f"screening ({detector_name}, ray, {workers} workers)",
                       unit="img", enable=show_progress)
    try:
        for batch in _iterate(ray, scored):
            for k in np.unique(batch["block"]):
                mine = batch["block"] == k
                rows = partial.setdefault(int(k), [])
                rows += list(zip(batch["index"][mine].tolist(), batch["id"][mine].tolist(),
                                 batch["label"][mine].tolist(), batch["predicted"][mine].tolist(),
                                 batch["score"][mine].tolist(), batch["error"][mine].tolist()))
                bar.update(int(mine.sum()))
                if len(rows) == expected[int(k)]:
                    _commit_block(block_path(folder, *ranges[int(k)]), sorted(partial.pop(int(k))))
    finally:
        bar.close()
    if partial:
        raise EngineError(f"engine: ray returned blocks {sorted(partial)} incomplete; run the same command again to "
                          "score them (committed blocks are kept)")
    return workers


def _iterate(ray, dataset):
    """The dataset's output batches; a failure of Ray's (a task that kept failing, a lost cluster) becomes one
    EngineError line — the blocks committed so far are kept."""
    failures = (ray.exceptions.RayError, getattr(getattr(ray.data, "exceptions", None), "UserCodeException", ()))
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
    except failures as exc:
        cause = exc
        while cause is not None and not isinstance(cause, TrojanGuardError):  # a bad-input error of an actor
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is not None:
            raise cause from None
        raise EngineError(f"engine: ray failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); committed "
                          "blocks are kept — run the same command again to resume") from None


def _portable_scorer(scorer):
    """The scorer as the actors get it: on the CPU (a GPU actor moves it to its own GPU; a CPU actor on a node
    without CUDA could not even unpickle CUDA tensors) and keeping no report pictures (the driver makes those)."""
    import copy

    import torch

    keep_top, scorer.keep_top = scorer.keep_top, 0
    try:
        if getattr(scorer, "device", torch.device("cpu")).type == "cpu":
            return copy.copy(scorer)
        portable = copy.deepcopy(scorer)
        _move_scorer(portable, torch.device("cpu"))
        return portable
    finally:
        scorer.keep_top = keep_top


def _with_absolute_paths(source):
    """A copy of a folder or ``.npz`` source whose paths are absolute (ids unchanged), for actors elsewhere."""
    import copy

    source = copy.copy(source)
    if hasattr(source, "root"):
        source.root = Path(source.root).absolute()
        source.entries = [(Path(file).absolute(), label) for file, label in source.entries]
    if hasattr(source, "path"):
        source.path = Path(source.path).absolute()
    return source


def _commit_block(path: Path, rows: list) -> None:
    """One block's rows, durable and whole or absent: a CSV of BLOCK_COLUMNS, cells as in ``results.csv``
    (formula-safe text, ``repr`` scores: an exact round trip; score and prediction empty for an error row)."""
    buffer = io.StringIO()
    buffer.write(",".join(BLOCK_COLUMNS) + "\n")
    for index, sample_id, label, predicted, score, error in rows:
        write_row(buffer, [index, escape_cell(sample_id), escape_cell(label), "" if error else predicted,
                           "" if error else repr(float(score)), escape_cell(error)])
    write_atomic(path, buffer.getvalue())


def _read_block(path: Path) -> list:
    """The rows of a committed block (see :func:`_commit_block`)."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        if tuple(next(reader, ())) != BLOCK_COLUMNS:
            raise ResumeError(f"{path}: not a block of this version (expected the columns {','.join(BLOCK_COLUMNS)});"
                              " pass overwrite=True (CLI: --restart) to start over")
        return [(int(index), unescape_cell(sample_id), unescape_cell(label), int(predicted) if predicted else -1,
                 float(score) if score else math.nan, unescape_cell(error))
                for index, sample_id, label, predicted, score, error in reader]


def describe() -> str:
    """Where Ray would run (for ``trojanguard info``)."""
    try:
        import ray
    except ImportError:
        return f"not installed ({INSTALL_HINT})"
    return f"ray {ray.__version__}" + (f", RAY_ADDRESS={os.environ['RAY_ADDRESS']}" if "RAY_ADDRESS" in os.environ
                                       else "")
