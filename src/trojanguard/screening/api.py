"""``screen(model, data, ...)``: score every sample of a dataset with a detector, batch by batch, into a durable
results file that a killed run resumes from, and write a report."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trojanguard.errors import DataError
from trojanguard.progress import progress_bar
from trojanguard.screening import report as reporting
from trojanguard.screening.detectors import BatchScorer, build_detector
from trojanguard.screening.records import FORMAT, ResultsFile, ResumeError, Rows, read_header, write_atomic
from trojanguard.screening.sources import EMBEDDED, ZOO_PREFIX, ImageSource, SourceImages, open_source
from trojanguard.screening.thresholds import ROBUST_Z, quantile_threshold, robust_threshold

RESULTS_FILE = "results.csv"
CALIBRATION_FILE = "calibration.csv"
FIT_MAX_SAMPLES = 20_000  # detectors that fit on the screened data (features) use at most this many, evenly spaced
KILL_AFTER_ENV = "TROJANGUARD_SCREEN_KILL_AFTER"  # test hook: SIGKILL this process after that many batches
DEFAULT_FPR = 0.01
TOP_IN_SUMMARY = 100
NOT_SCORED = "not scored"  # error-column prefix: the image was read but the detector gave no finite score


@dataclass
class ScreenResult:
    """What :func:`screen` returns (every array has one entry per sample, in the data's order).

    ``scores`` are NaN and ``predicted`` −1 for unreadable samples (``readable`` False), which are never flagged.
    """

    out_dir: Path
    results_path: Path
    report_path: Path | None
    summary: dict
    threshold: float
    rule: str
    ids: list[str]
    scores: np.ndarray
    flagged: np.ndarray
    predicted: np.ndarray
    readable: np.ndarray
    resumed_from: int = 0
    images_per_second: float | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def flagged_ids(self) -> list[str]:
        return [self.ids[i] for i in np.flatnonzero(self.flagged)]

    def __repr__(self) -> str:
        return (f"ScreenResult({len(self.ids)} samples, {int(self.flagged.sum())} flagged, threshold "
                f"{self.threshold:.4g} ({self.rule}), out_dir={str(self.out_dir)!r})")


def model_sha256(model: nn.Module) -> str:
    """SHA-256 of the model's class name and state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{t.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _json_safe(value):
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def _first_difference(old, new, path: str = "") -> str:
    """The first key where two JSON values differ, as ``key: file has …, this run …``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
    shown = [json.dumps(v)[:80] for v in (old, new)]
    return f"{path}: the file has {shown[0]}, this run {shown[1]}"


def _score_source(scorer: BatchScorer, source: ImageSource, batch_size: int, desc: str, show_progress: bool
                  ) -> tuple[np.ndarray, list[str]]:
    """Scores of every readable sample of ``source`` (calibration), and their ids."""
    scores, ids = [], []
    bar = progress_bar(len(source), desc=desc, unit="img", enable=show_progress)
    try:
        for batch in source.batches(batch_size):
            ok = batch.readable
            if ok.any():
                batch_scores, _ = scorer(batch.x, batch.start)
                scores.append(batch_scores[ok].double().numpy())
                ids.extend(i for i, good in zip(batch.ids, ok.tolist()) if good)
            bar.update(len(batch))
    finally:
        bar.close()
    return (np.concatenate(scores) if scores else np.empty(0)), ids


def _resolve_calibration(calibration, data, threshold):
    if calibration == "auto":
        embedded = isinstance(data, (str, Path)) and (str(data) in EMBEDDED or str(data).startswith(ZOO_PREFIX))
        return "digits-test" if embedded and threshold is None else None
    if calibration is not None and threshold is not None:
        raise ValueError("threshold, calibration: pass one of them (a fixed threshold needs no calibration data)")
    return calibration


def screen(model: nn.Module, data, *, detector: str = "cd", out_dir: str | Path, fpr: float = DEFAULT_FPR,
           threshold: float | None = None, calibration="auto", batch_size: int = 64,
           detector_options: dict | None = None, top_k: int = 16, image_size: int | None = None, channels: int = 3,
           overwrite: bool = False, report: bool = True, show_progress: bool = True) -> ScreenResult:
    """Screen ``data`` for backdoor-triggered samples with ``model`` and the detector ``detector``.

    Args:
        model: the classifier the data is meant for (``(N, C, H, W)`` in [0, 1] → ``(N, K)`` logits); never modified.
        data: an image folder or ``.npz`` path (streamed: one batch in memory at a time), ``"digits"`` (the
            embedded training split), ``"zoo:<attack>"`` (a zoo model's poisoned training set, truth known), a
            tensor / ``ImageDataset``, or an :class:`~trojanguard.screening.ImageSource`.
        detector: a name from :data:`~trojanguard.screening.DETECTORS` — ``"cd"`` (Cognitive Distillation),
            ``"features"`` (robust feature-space Mahalanobis distance, fitted on the screened data itself) or
            ``"amortized"`` (where this version has it).
        out_dir: folder for ``results.csv`` (durable, resumable), the report and ``calibration.csv``.
        fpr: target false-positive rate when calibrating on clean reference data.
        threshold: a fixed threshold (no calibration).
        calibration: clean reference data (same kinds as ``data``; ``"digits-test"`` is the embedded held-out
            split) to set the threshold at its ``1 − fpr`` score quantile. ``"auto"``: ``"digits-test"`` for the
            embedded data, else none. None (no reference): the robust outlier rule on the screened scores
            (median + 3.5 · 1.4826 · MAD; see :mod:`trojanguard.screening.thresholds`).
        batch_size: samples per batch (what is in memory and what one fsync covers).
        detector_options: keyword arguments of the detector (e.g. ``{"steps": 50}`` for CD).
        top_k: samples in the report's grid (CD recomputes their masks; their scores come from the run).
        image_size: side every source's images are resized to; None (default): the data's own size for arrays
            and tensors, 32 for folders and the embedded digits.
        channels: what folder images are converted to (1 or 3).
        overwrite: start over even if ``out_dir`` holds results of a different run (else that is an error, and
            results of the same run are resumed).
        report: write the report (``summary.json``, ``histogram.png``, ``suspicious.png``, ``index.html``).
        show_progress: progress bars (images/s) on a terminal.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    if top_k < 0:
        raise ValueError(f"top_k: expected a number >= 0, got {top_k}")
    if not 0 < fpr < 1:
        raise ValueError(f"fpr: expected a false-positive rate in (0, 1), got {fpr}")
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError(f"threshold: expected a finite number, got {threshold}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    calibration = _resolve_calibration(calibration, data, threshold)
    source = open_source(data, image_size=image_size, channels=channels)
    if len(source) == 0:
        raise DataError("data: no samples to screen")
    reference = None if calibration is None else open_source(calibration, image_size=image_size, channels=channels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    detector_name = detector
    detector, scorer = build_detector(detector_name, model, detector_options, show_progress=show_progress)
    _check_model_fits(scorer, source, "data")
    if reference is not None:
        _check_model_fits(scorer, reference, "calibration")
    rule = "fixed" if threshold is not None else "quantile" if reference is not None else "robust_z"
    run = _json_safe({
        "format": FORMAT,
        "model_sha256": model_sha256(model),
        "detector": {"name": detector_name, "options": detector_options or {}, "repr": repr(detector)},
        "data": source.fingerprint(),
        "calibration": None if reference is None else reference.fingerprint(),
        "rule": {"name": rule, "fpr": fpr if rule == "quantile" else None,
                 "threshold": None if threshold is None else float(threshold),
                 "z": ROBUST_Z if rule == "robust_z" else None},
    })
    results = ResultsFile(out_dir / RESULTS_FILE)
    meta, done = None, 0
    if results.path.exists() and not overwrite:
        meta = read_header(results.path)
        if meta.get("run") != run:
            raise ResumeError(f"{results.path} holds results of a different run ({_first_difference(meta.get('run'), run)}"
                              "); use another output folder, or overwrite=True (CLI: --restart) to start over")
        done = len(results.read(repair=True)[1])
        if done > len(source):
            raise ResumeError(f"{results.path} has {done} rows but the data has {len(source)} samples")

    if scorer.needs_reference:  # e.g. features: fitted on (an evenly spaced subset of) the screened data itself
        scorer.prepare(SourceImages(source, batch_size, limit=FIT_MAX_SAMPLES))
    else:
        scorer.prepare(None)

    calibration_scores = None
    if meta is None:
        threshold_value = None if threshold is None else float(threshold)
        if rule == "quantile":
            calibration_scores = _calibrate(scorer, reference, run, out_dir, batch_size, detector_name, show_progress)
            threshold_value = quantile_threshold(calibration_scores, fpr)
        meta = {"run": run, "threshold": threshold_value, "samples": len(source),
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "data_description": source.description,
                "calibration_description": None if reference is None else reference.description}
        results.create(meta)
    elif rule == "quantile":
        calibration_scores = _read_calibration(out_dir, run)

    threshold_value = meta["threshold"]
    resumed_from = done
    started = time.perf_counter()
    scorer.keep_top = top_k if report else 0
    _stream(scorer, source, results, done, batch_size, threshold_value, detector_name, show_progress)
    scorer.keep_top = 0
    seconds = time.perf_counter() - started
    screened_now = len(source) - resumed_from

    meta, rows = results.read()
    if len(rows) != len(source):
        raise ResumeError(f"{results.path}: {len(rows)} rows after the run, expected {len(source)}")
    readable = rows.readable
    if not readable.any():
        raise DataError(f"data: none of the {len(rows)} samples could be screened (first: {rows.errors[0]}); "
                        f"every row with its reason is in {results.path}")
    if threshold_value is None:
        threshold_value = robust_threshold(rows.scores[readable])
    flagged = readable & (rows.scores > threshold_value)
    expected_flags = np.where(readable, flagged.astype(np.int8), -1).astype(np.int8)
    if not meta.get("complete") or meta.get("threshold") != threshold_value or not np.array_equal(rows.flagged,
                                                                                                  expected_flags):
        meta = {**meta, "threshold": threshold_value, "complete": True}
        rows.flagged = expected_flags
        results.rewrite(meta, rows)

    rate = screened_now / seconds if screened_now and seconds > 0 else None
    run_info = {"resumed_from": resumed_from, "screened_now": screened_now, "seconds": seconds,
                "images_per_second": rate, "batch_size": batch_size}
    summary = _summary(rows, flagged, source, meta, run, rule, fpr, threshold_value, run_info, top_k, detector)
    files = {"results": results.path}
    report_path = None
    if report:
        files.update(_write_report(out_dir, summary, rows, flagged, source, scorer, calibration_scores,
                                   threshold_value, rule, detector_name, top_k))
        report_path = files["html"]
    return ScreenResult(out_dir, results.path, report_path, summary, threshold_value, rule, rows.ids, rows.scores,
                        flagged, rows.predicted, readable, resumed_from, rate, files)


# ------------------------------------------------------------------------------------------------ internals
def _check_model_fits(scorer: BatchScorer, source: ImageSource, what: str) -> None:
    """One forward pass on the first sample: a model that cannot take the data fails here, with both named."""
    batch = source.read(0, 1)
    try:
        scorer.predict(batch.x)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 — shape / channel mismatches surface as RuntimeError from any layer
        raise DataError(f"model: cannot take the {what}'s images of shape {tuple(batch.x.shape[1:])} "
                        f"({source.description}): {type(exc).__name__}: {exc}") from None


def _calibrate(scorer, reference, run, out_dir, batch_size, detector_name, show_progress) -> np.ndarray:
    scores, ids = _score_source(scorer, reference, batch_size, f"calibrating ({detector_name})", show_progress)
    lines = ["# trojanguard-calibration " + json.dumps({"run": run}, sort_keys=True), "index,id,score"]
    lines += [f"{i},{json.dumps(sample_id)},{float(s)!r}" for i, (sample_id, s) in enumerate(zip(ids, scores))]
    write_atomic(out_dir / CALIBRATION_FILE, "\n".join(lines) + "\n")
    return scores


def _read_calibration(out_dir: Path, run: dict) -> np.ndarray | None:
    """Clean reference scores of an earlier invocation of the same run (for the histogram), if still there."""
    path = out_dir / CALIBRATION_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        if json.loads(lines[0].split(" ", 2)[2]).get("run") != run:
            return None
        return np.array([float(line.rsplit(",", 1)[1]) for line in lines[2:]], dtype=np.float64)
    except (OSError, IndexError, ValueError):
        return None


def _stream(scorer, source, results, done, batch_size, threshold, detector_name, show_progress) -> None:
    """Score samples ``done …`` batch by batch, appending each batch's rows durably before the next starts."""
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    bar = progress_bar(len(source), desc=f"screening ({detector_name})", unit="img", initial=done,
                       enable=show_progress)
    batches = 0
    try:
        for batch in source.batches(batch_size, start=done):
            ok = batch.readable
            scores = torch.full((len(batch),), math.nan, dtype=torch.float64)
            predicted = torch.full((len(batch),), -1, dtype=torch.int64)
            if ok.any():  # unreadable samples keep their (zero) slot, so every sample keeps its index
                batch_scores, batch_predicted = scorer(batch.x, batch.start)
                scores[ok] = batch_scores[ok].double()
                predicted[ok] = batch_predicted[ok]
            errors = [batch.errors.get(i, "") for i in range(len(batch))]
            for i in (ok & ~torch.isfinite(scores)).nonzero().flatten().tolist():  # never a silent NaN among scores
                errors[i] = f"{NOT_SCORED}: {detector_name} returned {scores[i].item()} for this image"
            flags = [None] * len(batch) if threshold is None else [int(s > threshold) for s in scores.tolist()]
            results.append(batch.start, batch.ids, batch.labels, predicted.tolist(), scores.tolist(), flags, errors)
            bar.update(len(batch))
            batches += 1
            if kill_after and batches >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()


def _summary(rows: Rows, flagged, source, meta, run, rule, fpr, threshold, run_info, top_k, detector) -> dict:
    import trojanguard

    readable = rows.readable
    unscored = sum(error.startswith(NOT_SCORED) for error in rows.errors)
    scores = rows.scores[readable]
    order = [int(i) for i in np.lexsort((np.arange(len(rows)), -np.nan_to_num(rows.scores, nan=-np.inf)))
             if readable[i]]
    truth = None if source.truth is None else source.truth.numpy().astype(bool)
    top = []
    for rank, i in enumerate(order[:TOP_IN_SUMMARY], start=1):
        item = {"rank": rank, "index": i, "id": rows.ids[i], "label": rows.labels[i], "predicted": int(rows.predicted[i]),
                "score": float(rows.scores[i]), "flagged": bool(flagged[i])}
        if truth is not None:
            item["poisoned"] = bool(truth[i])
        top.append(item)
    per_label: dict[str, dict[str, int]] = {}
    for label in sorted(set(rows.predicted[readable].tolist())):
        members = readable & (rows.predicted == label)
        per_label[str(label)] = {"screened": int(members.sum()), "flagged": int((members & flagged).sum())}
    descriptions = {
        "quantile": f"clean reference scores' {1 - fpr:.4g} quantile (target false-positive rate {fpr:g})",
        "robust_z": f"robust outlier rule on the screened scores: median + {ROBUST_Z} × 1.4826 × MAD "
                    "(no clean reference data; does not control the false-positive rate)",
        "fixed": "fixed by the caller",
    }
    summary = {
        "trojanguard": trojanguard.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {"sha256": run["model_sha256"]},
        "detector": {"name": run["detector"]["name"], "options": run["detector"]["options"], "repr": repr(detector)},
        "data": {"description": source.description, "fingerprint": run["data"]},
        "samples": len(rows),
        "screened": int(readable.sum()),
        "unreadable": int((~readable).sum()) - unscored,
        "unscored": unscored,
        "flagged": int(flagged.sum()),
        "flagged_fraction": float(flagged.sum() / max(1, readable.sum())),
        "threshold": {"value": float(threshold), "rule": rule, "description": descriptions[rule],
                      "fpr": fpr if rule == "quantile" else None,
                      "calibration": meta.get("calibration_description")},
        "scores": {k: float(f(scores)) if len(scores) else None for k, f in
                   (("min", np.min), ("median", np.median), ("mean", np.mean), ("max", np.max))},
        "flags_by_predicted_label": per_label,
        "run": run_info,
        "grid_size": min(top_k, len(order)),
        "top": top,
        "unreadable_samples": [{"index": int(i), "id": rows.ids[i], "error": rows.errors[i]}
                               for i in np.flatnonzero(~readable)[:1000]],
    }
    if truth is not None:
        from trojanguard.metrics import auroc

        t, f = truth[readable], flagged[readable]
        summary["truth"] = {
            "poisoned": int(t.sum()),
            "auroc": float(auroc(t, scores)) if 0 < t.sum() < len(t) else None,
            "precision": float((t & f).sum() / f.sum()) if f.sum() else 0.0,
            "recall": float((t & f).sum() / t.sum()) if t.sum() else 0.0,
            "false_positive_rate": float((~t & f).sum() / (~t).sum()) if (~t).sum() else 0.0,
        }
    return summary


def _write_report(out_dir, summary, rows, flagged, source, scorer, calibration_scores, threshold, rule,
                  detector_name, top_k) -> dict[str, Path]:
    files = {"summary": out_dir / "summary.json", "histogram": out_dir / "histogram.png",
             "html": out_dir / "index.html"}
    readable = rows.readable
    truth = None if source.truth is None else source.truth.numpy().astype(bool)[readable]
    reporting.write_histogram(files["histogram"], rows.scores[readable], threshold, rule,
                              calibration=calibration_scores, truth=truth, detector=detector_name)
    top = [t["index"] for t in summary["top"][:top_k]]
    grid = None
    if top:
        images = source.take(top)
        explanation = scorer.explain(images, top) if scorer.explain is not None else {}
        captions = [f"#{t['rank']} {t['score']:.3g} → {t['predicted']}" for t in summary["top"][:top_k]]
        files["grid"] = out_dir / "suspicious.png"
        reporting.write_grid(files["grid"], images, captions, flagged=[t["flagged"] for t in summary["top"][:top_k]],
                             masks=explanation.get("masks"), patterns=explanation.get("patterns"))
        grid = files["grid"].name
    reporting.write_summary(files["summary"], summary)
    reporting.write_html(files["html"], summary, histogram=files["histogram"].name, grid=grid)
    return files
