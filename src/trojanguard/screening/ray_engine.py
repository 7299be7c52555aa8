"""Screening on Ray Data (``screen(..., engine="ray")``, CLI ``--engine ray``): the same detectors, rows and report
as the local engine, scored by a pool of actors on one machine or a cluster.

How a run goes:
- The driver fits the detector as locally (on a sample or a reference set) and calibrates the threshold; the fitted
  scorer and the source (paths for folders and ``.npz``: each actor reads only its own samples) are put in Ray's
  object store once and every actor holds them.
- The samples are cut into **blocks** of whole batches (``block_size``, a multiple of ``batch_size``; a block's
  batches start where the local engine's do, so its rows are computed on the same batches). A Ray dataset of block
  descriptions runs through ``map_batches`` on an actor pool (``workers`` actors, ``gpus_per_worker`` GPUs each).
- Each finished block is **committed atomically** by the driver to ``OUT/blocks/rows-<start>-<stop>.jsonl``
  (temporary file, fsync, rename): a killed driver or worker loses at most the blocks in flight, and a re-run
  skips the committed ones. Ray restarts a killed actor and retries its block.
- When every block is committed, their rows are appended to ``results.csv`` in index order, and the run ends as a
  local one does (threshold, flags, report), so the final files equal an uninterrupted run's row for row.

Block files are the driver's only: workers need no shared file system, only the data paths (a folder or ``.npz``
visible at the same path on every node, or in-memory data shipped through the object store).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from trojanguard.errors import TrojanGuardError, check_positive_int
from trojanguard.progress import progress_bar
from trojanguard.screening.records import write_atomic

BLOCKS_DIR = "blocks"
LAYOUT_FILE = "layout.json"
INSTALL_HINT = "pip install 'trojanguard[ray]' (Ray Data: ray[data])"
DEFAULT_BATCHES_PER_BLOCK = 4


class EngineUnavailableError(TrojanGuardError, ValueError):
    """The requested engine cannot run here (Ray not installed, or no cluster at the address)."""


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
    return folder / f"rows-{start:012d}-{stop:012d}.jsonl"


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
        if torch.cuda.is_available() and ray.get_gpu_ids():  # a GPU actor: the scorer's modules move there
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
        rows = [row for row in _read_block(block_path(folder, start, stop)) if row[0] >= done]
        if not rows:
            continue
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
        recorded = json.loads(layout.read_text(encoding="utf-8"))
        if recorded.get("batch_size") == batch_size:
            return int(recorded["block_size"])
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
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = min(options.workers or cpus, len(pending))
    scorer_ref, source_ref = ray.put(scorer), ray.put(source)
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
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
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
        raise RuntimeError(f"ray engine: blocks {sorted(partial)} came back incomplete")
    return workers


def _commit_block(path: Path, rows: list) -> None:
    """One block's rows, durable and whole or absent: ``[index, id, label, predicted, score, error]`` per line."""
    write_atomic(path, "".join(json.dumps(list(row)) + "\n" for row in rows))


def _read_block(path: Path) -> list:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def describe() -> str:
    """Where Ray would run (for ``trojanguard info``)."""
    try:
        import ray
    except ImportError:
        return f"not installed ({INSTALL_HINT})"
    return f"ray {ray.__version__}" + (f", RAY_ADDRESS={os.environ['RAY_ADDRESS']}" if "RAY_ADDRESS" in os.environ
                                       else "")
