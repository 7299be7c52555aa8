"""``screen(model, data, ...)``: score every sample of a dataset with a detector, batch by batch, into a durable
results file that a killed run resumes from, and write a report."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trojanguard.detect.base import Explains, LabelWarning, SampleSizeWarning
from trojanguard.detect.ensemble import CHECKPOINT_MAGIC
from trojanguard.errors import DataError, check_choice, check_positive_int
from trojanguard.models.io import check_finite_weights, model_sha256
from trojanguard.progress import progress_bar
from trojanguard.screening import report as reporting
from trojanguard.screening.detectors import DEFAULT_DETECTOR, FIT_CHECKPOINT, BatchScorer, build_detector
from trojanguard.screening.ray_engine import RayOptions, clear_blocks, require_ray, stream_ray
from trojanguard.screening.records import (
    FORMAT,
    MAGIC,
    ResultsFile,
    ResumeError,
    Rows,
    escape_cell,
    read_header,
    write_atomic,
)
from trojanguard.screening.sources import (
    EMBEDDED,
    ZOO_PREFIX,
    ImageSource,
    SourceImages,
    fingerprint_digest,
    open_source,
)
from trojanguard.thresholds import ROBUST_Z, check_calibration_size, quantile_threshold, robust_threshold

ENGINES = ("local", "ray")  # where the blocks of a run are scored: this process, or a Ray actor pool

RESULTS_FILE = "results.csv"
CALIBRATION_FILE = "calibration.csv"
CALIBRATION_MAGIC = "# trojanguard-calibration "
MASK_MEAN_SAMPLES = 32  # the report's mean masks average at most this many flagged and as many unflagged samples
FIT_MAX_SAMPLES = 20_000  # detectors that fit on the screened data (features) use at most this many, evenly spaced
DEFAULT_FPR = 0.01
TOP_IN_SUMMARY = 100
NOT_SCORED = "not scored"  # error-column prefix: the image was read but the detector returned NaN (inf is a score)


@dataclass
class ScreenResult:
    """What :func:`screen` returns (every array has one entry per sample, in the data's order).

    ``scores`` are NaN and ``predicted`` −1 for unreadable samples (``readable`` False), which are never flagged;
    a score of +inf is the highest suspicion (flagged, ranked first).
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


def screen(model: nn.Module, data, *, detector: str = DEFAULT_DETECTOR, out_dir: str | Path, fpr: float = DEFAULT_FPR,
           threshold: float | None = None, calibration="auto", batch_size: int = 64,
           detector_options: dict | None = None, top_k: int = 16, image_size: int | None = None, channels: int = 3,
           overwrite: bool = False, report: bool = True, show_progress: bool = True, reference=None,
           detector_file: str | Path | None = None, command: str | None = None, engine: str = "local",
           ray: RayOptions | dict | None = None) -> ScreenResult:
    """Screen ``data`` for backdoor-triggered samples with ``model`` and the detector ``detector``.

    Args:
        model: the classifier the data is meant for (``(N, C, H, W)`` in [0, 1] → ``(N, K)`` logits); never modified.
        data: an image folder or ``.npz`` path (streamed: one batch in memory at a time), ``"digits"`` (the
            embedded training split), ``"zoo:<attack>"`` (a zoo model's poisoned training set, truth known), a
            tensor / ``ImageDataset``, or an :class:`~trojanguard.screening.ImageSource`.
        detector: a name from :data:`~trojanguard.screening.DETECTORS` — ``"ensemble"`` (the default,
            ``screening.detectors.DEFAULT_DETECTOR``: ``features``, ``clustering`` and ``typicality`` fused without
            labels; CD members on request), ``"cd"`` (Cognitive Distillation), ``"features"`` (robust feature-space
            Mahalanobis distance), ``"spectral"`` (Spectral Signatures), ``"clustering"`` (Activation Clustering),
            ``"typicality"`` (class-agnostic distance at a middle layer) — the ensemble and those four are fitted on
            the screened data itself — or ``"amortized"`` (where this version has it).
        out_dir: folder for ``results.csv`` (durable, resumable), the report and ``calibration.csv``.
        fpr: target false-positive rate when calibrating on clean reference data.
        threshold: a fixed threshold (no calibration).
        calibration: clean reference data (same kinds as ``data``; ``"digits-test"`` is the embedded held-out
            split) to set the threshold at its ``1 − fpr`` score quantile. ``"auto"``: ``"digits-test"`` for the
            embedded data, else none. None (no reference): the robust outlier rule on the screened scores
            (median + 3.5 · 1.4826 · MAD; see :mod:`trojanguard.thresholds`).
        batch_size: samples per batch (what is in memory and what one fsync covers).
        detector_options: keyword arguments of the detector (e.g. ``{"steps": 50}`` for CD).
        top_k: samples in the report's grid (CD recomputes their masks; their scores come from the run).
        image_size: side every source's images are resized to; None (default): the data's own size for arrays
            and tensors, 32 for folders and the embedded digits.
        channels: what folder images are converted to (1 or 3).
        overwrite: start over even if ``out_dir`` holds results of a different run (else that is an error, and
            results of the same run are resumed).
        report: write the report (``summary.json``, ``histogram.png``, ``suspicious.png``, ``masks.png`` for
            detectors with masks, ``index.html``). ``flagged.txt`` and ``kept.txt`` (one sample id per line) are
            written either way.
        show_progress: progress (images/s): a bar on a terminal, plain lines in a log (see
            :mod:`trojanguard.progress`).
        command: the command line that started the run, for the report (the CLI passes its own).
        reference: trusted data (same kinds as ``data``) to fit a detector that needs fitting (``features``,
            ``amortized``) instead of the screened data itself — needed when the screened data cannot support a
            self-fit (a predicted class rare or mostly poison; ``summary["fit"]`` says so).
        detector_file: a fitted ``features`` detector written by ``FeatureMahalanobis.save`` (safetensors), for
            the same model; replaces the fit.
        engine: ``"local"`` (this process, the default) or ``"ray"``: the blocks of the data scored by an actor
            pool on Ray Data (:mod:`trojanguard.screening.ray_engine`; needs ``trojanguard[ray]``), with the same
            rows, resume and report.
        ray: :class:`~trojanguard.screening.ray_engine.RayOptions` (or a dict of them: ``address``, ``workers``,
            ``gpus_per_worker``, ``block_size``) for ``engine="ray"``.
    """
    started_total = time.perf_counter()
    check_positive_int("batch_size", batch_size)
    if top_k < 0:
        raise ValueError(f"top_k: expected a number >= 0, got {top_k}")
    if not 0 < fpr < 1:
        raise ValueError(f"fpr: expected a false-positive rate in (0, 1), got {fpr}")
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError(f"threshold: expected a finite number, got {threshold}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_finite_weights(model.state_dict(), "model")  # NaN weights would 'screen' every sample as class 0
    check_choice("engine", engine, ENGINES)
    if ray is not None and engine != "ray":
        raise ValueError(f"ray: options for engine='ray', got engine={engine!r}")
    ray_options = ray if isinstance(ray, RayOptions) else RayOptions(**(ray or {}))
    if engine == "ray":
        ray_options.check(batch_size)
        require_ray()  # before any work: how to install it
    out_dir = check_out_dir(out_dir)
    calibration = _resolve_calibration(calibration, data, threshold)
    source = open_source(data, image_size=image_size, channels=channels)
    if len(source) == 0:
        raise DataError("data: no samples to screen")
    if reference is not None and detector_file is not None:
        raise ValueError("reference, detector_file: pass one of them (a detector file is already fitted)")
    if detector_file is not None and (detector != "features" or detector_options):
        raise ValueError(f"detector_file: expected detector 'features' without detector_options (the file holds its "
                         f"fit and options), got detector {detector!r}, options {detector_options or {}}")
    fit_source = None if reference is None else open_source(reference, image_size=image_size, channels=channels,
                                                            name="reference")
    reference = None if calibration is None else open_source(calibration, image_size=image_size, channels=channels,
                                                             name="calibration")
    if reference is not None and threshold is None:
        check_calibration_size(len(reference), fpr, "calibration")
    out_dir.mkdir(parents=True, exist_ok=True)

    detector_name = detector
    detector, scorer = build_detector(detector_name, model, detector_options, show_progress=show_progress)
    own_threshold = getattr(detector, "DECISION_THRESHOLD", None)
    own_rule = threshold is None and reference is None and own_threshold is not None
    if own_rule:
        threshold = own_threshold  # a detector with a decision rule of its own (PoisonCAM: probability > 0.5)
    if detector_file is not None:
        from trojanguard.detect import FeatureMahalanobis

        detector = scorer.detector = FeatureMahalanobis.load(detector_file, model, show_progress=False)
        if tuple(source.read(0, 1).x.shape[1:]) != tuple(detector.input_shape):
            raise DataError(f"data: expected images of shape {tuple(detector.input_shape)} (the detector file's fit),"
                            f" got {tuple(source.read(0, 1).x.shape[1:])}")
    if fit_source is not None and not scorer.needs_reference:
        raise ValueError(f"reference: detector {detector_name!r} is not fitted on data; reference data is for "
                         "detectors that are (features, amortized)")
    _check_model_fits(scorer, source, "data")
    if reference is not None:
        _check_model_fits(scorer, reference, "calibration")
    if fit_source is not None:
        _check_model_fits(scorer, fit_source, "reference")
    rule = ("detector" if own_rule else "fixed" if threshold is not None else "quantile" if reference is not None
            else "robust_z")
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
    if fit_source is not None:  # only when set, so results of earlier runs without it still resume
        run["fit"] = _json_safe({"reference": fit_source.fingerprint()})
    elif detector_file is not None:
        run["fit"] = {"detector_file": hashlib.sha256(Path(detector_file).read_bytes()).hexdigest()}
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

    fit_started = time.perf_counter()
    scorer.work_dir = out_dir
    fit_info = _prepare(scorer, source, fit_source, detector_file, batch_size)
    fit_seconds = time.perf_counter() - fit_started

    calibration_scores, calibration_seconds = None, 0.0
    if meta is None:
        threshold_value = None if threshold is None else float(threshold)
        if rule == "quantile":
            calibration_started = time.perf_counter()
            calibration_scores = _calibrate(scorer, reference, run, out_dir, batch_size, detector_name, show_progress)
            calibration_seconds = time.perf_counter() - calibration_started
            threshold_value = quantile_threshold(calibration_scores, fpr, "calibration")
        meta = {"run": run, "threshold": threshold_value, "samples": len(source),
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "data_description": source.description,
                "calibration_description": None if reference is None else reference.description}
        clear_blocks(out_dir)  # committed blocks of an earlier run (ray engine) belong to that run: first
        results.create(meta)
    elif rule == "quantile":
        calibration_scores = _read_calibration(out_dir, run)

    threshold_value = meta["threshold"]
    resumed_from = done
    started = time.perf_counter()
    scorer.keep_top = top_k if report else 0
    engine_info = {"engine": "local"}
    if engine == "ray":
        engine_info = stream_ray(scorer, source, results, done, batch_size, threshold_value, detector_name,
                                 show_progress, ray_options, out_dir)
    else:
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
    run_info = {**engine_info, "resumed_from": resumed_from, "screened_now": screened_now, "seconds": seconds,
                "images_per_second": rate, "batch_size": batch_size, "fit_seconds": fit_seconds,
                "calibration_seconds": calibration_seconds}
    summary = _summary(rows, flagged, source, meta, run, rule, fpr, threshold_value, run_info, top_k, detector,
                       calibration_scores, command)
    summary["fit"] = fit_info
    files = {"results": results.path, **_write_lists(out_dir, rows, flagged)}
    report_path = None
    report_started = time.perf_counter()
    figures = {}
    if report:
        figures = _write_figures(out_dir, summary, rows, flagged, source, scorer, calibration_scores,
                                 threshold_value, rule, detector_name, top_k)
        files.update(figures)
    finished = time.perf_counter()
    total = finished - started_total
    run_info.update(report_seconds=finished - report_started, total_seconds=total,
                    end_to_end_images_per_second=screened_now / total if screened_now and total > 0 else None)
    if report:
        files["summary"] = reporting.write_summary(out_dir / "summary.json", summary)
        files["html"] = reporting.write_html(out_dir / "index.html", summary, histogram=figures["histogram"].name,
                                             grid=figures["grid"].name if "grid" in figures else None,
                                             masks=figures["masks"].name if "masks" in figures else None,
                                             gallery=figures["gallery"].name if "gallery" in figures else None)
        report_path = files["html"]
    return ScreenResult(out_dir, results.path, report_path, summary, threshold_value, rule, rows.ids, rows.scores,
                        flagged, rows.predicted, readable, resumed_from, rate, files)


def _write_lists(out_dir: Path, rows: Rows, flagged: np.ndarray) -> dict[str, Path]:
    """``flagged.txt`` (flagged samples) and ``kept.txt`` (screened, not flagged): one sample id per line, in the
    data's order, for the next step of a pipeline. Unreadable samples are in neither (see results.csv)."""
    kept = rows.readable & ~flagged
    files = {"flagged_list": out_dir / reporting.FLAGGED_NAME, "kept_list": out_dir / reporting.KEPT_NAME}
    for path, mask in ((files["flagged_list"], flagged), (files["kept_list"], kept)):
        write_atomic(path, "".join(f"{rows.ids[i]}\n" for i in np.flatnonzero(mask)))
    return files


# ------------------------------------------------------------------------------------------------ internals
def _prepare(scorer: BatchScorer, source: ImageSource, fit_source: ImageSource | None, detector_file,
             batch_size: int) -> dict | None:
    """Fit the detector when it needs it — on ``fit_source`` (trusted reference data) or else on (an evenly spaced
    subset of) the screened data itself — and describe the fit for the summary: what it was fitted on, samples per
    class, the fit's sample-size warnings and, for a self-fit, whether the screened data can support one."""
    if not scorer.needs_reference:
        scorer.prepare(None)
        if detector_file is None:
            return None
        on, description = "detector file", str(detector_file)
        caught: list[str] = []
    else:
        fit_data = source if fit_source is None else fit_source
        on = "screened data" if fit_source is None else "reference"
        description = fit_data.description
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always", SampleSizeWarning)
            warnings.simplefilter("always", LabelWarning)
            scorer.prepare(SourceImages(fit_data, batch_size, limit=FIT_MAX_SAMPLES))
        caught = [str(r.message) for r in records if issubclass(r.category, (SampleSizeWarning, LabelWarning))]
    detector = scorer.detector
    messages = list(dict.fromkeys(caught + list(getattr(detector, "fit_warnings", []) or [])))
    counts = getattr(detector, "class_counts", None)
    info = {"on": on, "description": description,
            "class_counts": None if counts is None else [int(c) for c in counts],
            "warnings": messages,
            "self_fit_supported": (not messages) if on == "screened data" else None}
    if hasattr(detector, "auto_members"):  # the ensemble: which members the fit chose, and whether labels were read
        info["members"] = list(detector.members)
        info["labels_read"] = detector.probe_read_labels
        info["gated_out"] = list(detector.gated_out)  # gated members the fit left out, and each gated one's p-value
        info["member_p_values"] = {name: float(p) for name, p in detector.member_p_values.items()}
        info["probe_filter"] = detector.fitted_probe_filter  # the probe whose easy half features' class fits left out
    if getattr(detector, "reference_fragility", None) is not None:  # the ensemble's class tests (detect/fragility.py)
        for key, attribute in (("noise_fragile_class", "fragile"), ("noise_stable_class", "stable")):
            fired, share, p = getattr(detector, attribute)
            info[key] = {"class": fired, "share": float(share), "p_value": float(p)}
        info["noise_fragile_class"]["vetoed_class"] = getattr(detector, "fragile_vetoed", None)  # outliers gather elsewhere
    return info


def check_out_dir(out_dir: str | Path, name: str = "out_dir") -> Path:
    """``out_dir`` as a Path when a screening run may write into it: it does not exist yet, is an empty folder,
    or holds an earlier screening run (``results.csv`` or ``calibration.csv`` that trojanguard wrote). Anything
    else is refused (:class:`ResumeError`, naming ``name``) so a run never overwrites files it did not write."""
    path = Path(out_dir)
    if not path.exists():
        existing = next((parent for parent in path.parents if parent.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ResumeError(f"{name}: expected a folder that can be created, got {str(path)!r} inside "
                              f"{str(existing)!r}, a file")
        return path
    if not path.is_dir():
        raise ResumeError(f"{name}: expected a folder for the screening results, got a file ({str(path)!r})")
    try:
        entries = sorted(entry.name for entry in path.iterdir())
    except OSError as exc:
        raise ResumeError(f"{name}: expected a readable folder, got {str(path)!r} ({exc.strerror})") from None
    if not entries or _holds_screening_run(path):
        return path
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise ResumeError(f"{name}: expected a new or empty folder, or the folder of an earlier 'trojanguard screen' "
                      f"run (its results.csv), got {str(path)!r} holding {len(entries)} file(s) and no screening "
                      f"results ({shown}); choose a new or empty folder")


def _holds_screening_run(path: Path) -> bool:
    """True when ``path`` has a results or calibration file whose first line is trojanguard's."""
    for name, magic in ((RESULTS_FILE, MAGIC), (CALIBRATION_FILE, CALIBRATION_MAGIC),
                        (FIT_CHECKPOINT, CHECKPOINT_MAGIC)):
        try:
            with open(path / name, encoding="utf-8", errors="replace") as f:
                if f.readline(200).startswith(magic):
                    return True
        except OSError:
            continue
    return False


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
    lines = [CALIBRATION_MAGIC + json.dumps({"run": run}, sort_keys=True), "index,id,score"]
    lines += [f"{i},{json.dumps(escape_cell(sample_id))},{float(s)!r}"  # ids formula-safe, as in results.csv
              for i, (sample_id, s) in enumerate(zip(ids, scores))]
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
    bar = progress_bar(len(source), desc=f"screening ({detector_name})", unit="img", initial=done,
                       enable=show_progress)
    try:
        for batch in source.batches(batch_size, start=done):
            predicted, scores, errors = score_batch(scorer, batch, detector_name)
            flags = [None] * len(batch) if threshold is None else [int(s > threshold) for s in scores]
            results.append(batch.start, batch.ids, batch.labels, predicted, scores, flags, errors)
            bar.update(len(batch))
    finally:
        bar.close()


def score_batch(scorer, batch, detector_name: str) -> tuple[list[int], list[float], list[str]]:
    """Predicted class, score and error text of every sample of ``batch`` — the rows' content, the same for
    every engine. Unreadable samples keep their (zero) slot, so every sample keeps its index; a NaN score is
    never silent (it becomes the row's error; inf is a score)."""
    ok = batch.readable
    scores = torch.full((len(batch),), math.nan, dtype=torch.float64)
    predicted = torch.full((len(batch),), -1, dtype=torch.int64)
    if ok.any():
        batch_scores, batch_predicted = scorer(batch.x, batch.start)
        scores[ok] = batch_scores[ok].double()
        predicted[ok] = batch_predicted[ok]
    errors = [batch.errors.get(i, "") for i in range(len(batch))]
    for i in (ok & torch.isnan(scores)).nonzero().flatten().tolist():
        errors[i] = f"{NOT_SCORED}: {detector_name} returned {scores[i].item()} for this image"
    return predicted.tolist(), scores.tolist(), errors


def _summary(rows: Rows, flagged, source, meta, run, rule, fpr, threshold, run_info, top_k, detector,
             calibration_scores, command) -> dict:
    import trojanguard

    readable = rows.readable
    unscored = sum(error.startswith(NOT_SCORED) for error in rows.errors)
    scores = rows.scores[readable]
    finite = scores[np.isfinite(scores)]
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
        "detector": f"the detector's own decision rule (score > {threshold:g})",
    }
    summary = {
        "trojanguard": trojanguard.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {"sha256": run["model_sha256"]},
        "detector": {"name": run["detector"]["name"], "options": run["detector"]["options"], "repr": repr(detector)},
        "command": command,
        "working_directory": os.getcwd(),
        "data": {"description": source.description, "fingerprint": run["data"], "digest": fingerprint_digest(run["data"])},
        "samples": len(rows),
        "screened": int(readable.sum()),
        "unreadable": int((~readable).sum()) - unscored,
        "unscored": unscored,
        "flagged": int(flagged.sum()),
        "flagged_fraction": float(flagged.sum() / max(1, readable.sum())),
        "threshold": {"value": float(threshold), "rule": rule, "description": descriptions[rule],
                      "fpr": fpr if rule == "quantile" else None,
                      "calibration": meta.get("calibration_description")},
        # statistics of the finite scores; infinite ones (most suspicious, flagged) are counted apart
        "scores": {**{k: float(f(finite)) if len(finite) else None for k, f in
                      (("min", np.min), ("median", np.median), ("mean", np.mean), ("max", np.max))},
                   "infinite": int(np.isinf(scores).sum())},
        "clean_flags": reporting.clean_flag_expectation(int(flagged.sum()), int(readable.sum()), rule, fpr=fpr,
                                                        calibration=calibration_scores, threshold=threshold),
        "flags_by_predicted_label": per_label,
        "target": reporting.target_label_test(rows.predicted[readable], flagged[readable]),
        "lists": {"flagged": reporting.FLAGGED_NAME, "kept": reporting.KEPT_NAME},
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


def _write_figures(out_dir, summary, rows, flagged, source, scorer, calibration_scores, threshold, rule,
                   detector_name, top_k) -> dict[str, Path]:
    """The report's figures: histogram, grid of the most suspicious samples and, for a detector with masks, the
    mean masks of flagged vs unflagged samples (``summary["mask_means"]`` is filled in then)."""
    files = {"histogram": out_dir / "histogram.png"}
    readable = rows.readable
    truth = None if source.truth is None else source.truth.numpy().astype(bool)[readable]
    reporting.write_histogram(files["histogram"], rows.scores[readable], threshold, rule,
                              calibration=calibration_scores, truth=truth, detector=detector_name)
    shown = summary["top"][:top_k]
    top = [t["index"] for t in shown]
    groups = {"flagged": _evenly_spaced(np.flatnonzero(flagged)),
              "unflagged": _evenly_spaced(np.flatnonzero(readable & ~flagged))}
    with_masks = isinstance(scorer, Explains) and all(len(g) for g in groups.values())
    wanted = list(dict.fromkeys(top + (groups["flagged"] + groups["unflagged"] if with_masks else [])))
    if not wanted:
        return files
    images = source.take(wanted)
    explanation = scorer.explain(images, wanted) if isinstance(scorer, Explains) else {}
    position = {index: k for k, index in enumerate(wanted)}

    def pick(name, indices):
        value = explanation.get(name)
        return None if value is None else value[[position[i] for i in indices]]

    if top:
        captions = [f"#{t['rank']} {reporting.short_id(t['id'])}\n{t['score']:.3g} → {t['predicted']}" for t in shown]
        files["grid"] = reporting.write_grid(out_dir / "suspicious.png", images[[position[i] for i in top]], captions,
                                             flagged=[t["flagged"] for t in shown], masks=pick("masks", top),
                                             patterns=pick("patterns", top),
                                             row_names=getattr(scorer, "PICTURE_ROWS", ("mask", "image × mask")))
    gallery = scorer.gallery() if hasattr(scorer, "gallery") else None
    if gallery is not None:
        title, pictures, captions = gallery
        files["gallery"] = reporting.write_grid(out_dir / "gallery.png", pictures, captions)
        summary["gallery"] = {"title": title, "count": len(pictures)}
    if with_masks and explanation.get("masks") is not None:
        flagged_masks, unflagged_masks = pick("masks", groups["flagged"]), pick("masks", groups["unflagged"])
        files["masks"] = reporting.write_mask_means(out_dir / "masks.png", flagged_masks, unflagged_masks)
        summary["mask_means"] = {"flagged": len(flagged_masks), "unflagged": len(unflagged_masks),
                                 "per_group": MASK_MEAN_SAMPLES, "flagged_mean": float(flagged_masks.float().mean()),
                                 "unflagged_mean": float(unflagged_masks.float().mean())}
    return files


def _evenly_spaced(indices: np.ndarray, count: int = MASK_MEAN_SAMPLES) -> list[int]:
    """At most ``count`` of ``indices``, evenly spaced over them (all when there are fewer)."""
    if len(indices) <= count:
        return [int(i) for i in indices]
    return [int(indices[k]) for k in np.linspace(0, len(indices) - 1, count).round().astype(int)]
