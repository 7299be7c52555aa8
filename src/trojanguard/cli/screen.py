"""trojanguard screen: score every sample of a dataset with a detector (choices: the screening registry,
trojanguard.screening.DETECTORS); durable results.csv (resumable) and a report in --out."""

from __future__ import annotations

import argparse
import json
import shlex

from trojanguard.cli._options import (
    MODEL_FILE_HELP,
    UsageError,
    add_arch_option,
    add_model_input_options,
    add_model_option,
    load_command_model,
    registry_help,
)

OUTPUTS = (("out", "folder"),)


def detector_option_arg(text: str):
    """KEY=VALUE of --detector-option: VALUE as JSON (numbers, true/false, null), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_parser(sub) -> None:
    from trojanguard.screening import DETECTORS
    from trojanguard.screening.detectors import DEFAULT_DETECTOR

    p = sub.add_parser("screen", help="score every sample of a dataset for backdoor triggers; report in --out",
                       description="Screen a dataset for backdoor-triggered samples, batch by batch. One row per "
                                   "sample is appended durably to OUT/results.csv; run the same command again to "
                                   "resume a stopped run. The report is OUT/index.html.")
    add_model_option(p, MODEL_FILE_HELP + ", zoo:<attack> (the zoo's backdoored digits model) or "
                        "ssl-zoo:<attack> (the SSL zoo's poisoned encoder, for --detector poisoncam)")
    add_arch_option(p)
    p.add_argument("--data", required=True,
                   help="image folder, .npz file (x: uint8 NHWC or float NCHW, optional y), digits (embedded), "
                        "zoo:<attack> (its poisoned training set) or ssl-zoo:<attack> (the SSL zoo encoder's "
                        "unlabeled set)")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, choices=sorted(DETECTORS),
                   help=registry_help(DETECTORS, DEFAULT_DETECTOR))
    p.add_argument("--out", required=True, help="output folder: results.csv, calibration.csv, flagged.txt, kept.txt "
                                                "and the report; new, empty, or an earlier screen run's (to resume)")
    fit = p.add_mutually_exclusive_group()
    fit.add_argument("--reference", help="trusted data to fit a fitted detector (features, amortized) on instead of "
                                         "the screened data: folder, .npz, digits")
    fit.add_argument("--detector-file", help="a fitted features detector (FeatureMahalanobis.save, .safetensors)")
    p.add_argument("--calibration", default="auto",
                   help="clean reference data for the threshold (folder, .npz, digits-test); 'auto' (default): "
                        "digits-test for embedded data, else none; 'none': robust outlier rule on the scores")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate on clean data (default 0.01)")
    p.add_argument("--threshold", type=float, help="a fixed threshold instead of calibration")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch / per durable write (default 64)")
    p.add_argument("--steps", type=int, help="CD optimisation steps (default 100)")
    p.add_argument("--detector-option", type=detector_option_arg, action="append", metavar="KEY=VALUE",
                   help="a detector keyword argument, e.g. fusion=rank or members=cd-p,features (ensemble), "
                        "mode=logits (cd) (repeatable)")
    p.add_argument("--top-k", type=int, default=16, help="samples in the report's grid (default 16)")
    p.add_argument("--restart", action="store_true", help="discard results of a different run in --out and start over")
    p.add_argument("--no-report", action="store_true", help="only results.csv (no summary, figures, HTML)")
    engine = p.add_argument_group("engine", "where the data's blocks are scored (docs/screening.md)")
    engine.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: this process (default); ray: an actor pool on Ray Data (pip install "
                             "'trojanguard[ray]'), same rows, resume and report")
    engine.add_argument("--address", help="--engine ray: the cluster (auto: the one this machine is in; "
                                          "ray://HOST:PORT; default: the running one, else a local one)")
    engine.add_argument("--workers", type=int, help="--engine ray: scoring actors (default: one per CPU)")
    engine.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="--engine ray: GPUs per actor (fractions share one; default 0: CPU actors)")
    engine.add_argument("--block-size", type=int,
                        help="--engine ray: samples per committed block, a multiple of --batch-size (default 4 "
                             "batches)")
    add_model_input_options(p)


def run(args: argparse.Namespace) -> int:
    """Screen a dataset with a detector; durable results.csv (resumable) and a report in --out."""
    from trojanguard.screening import screen
    from trojanguard.screening.api import check_out_dir

    options = dict(args.detector_option or [])
    if args.steps is not None:
        if args.detector not in ("cd", "ensemble"):
            raise UsageError(f"--steps: only for --detector cd or ensemble, got --detector {args.detector}")
        options["steps"] = args.steps
    if args.detector_file is not None and args.detector != "features":
        raise UsageError(f"--detector-file: only for --detector features, got --detector {args.detector}")
    if args.reference is not None and args.detector == "cd":
        raise UsageError("--reference: cd is not fitted on data (only features, amortized), got --detector cd")
    ray = None
    if args.engine == "ray":
        from trojanguard.screening.ray_engine import RayOptions, require_ray

        ray = RayOptions(args.address, args.workers, args.gpus_per_worker, args.block_size)
        try:
            ray.check(args.batch_size)
        except ValueError as exc:
            name, _, rest = str(exc).partition(": ")
            raise UsageError(f"--{name.replace('_', '-')}: {rest}") from None
        require_ray()
    else:
        given = [f"--{n.replace('_', '-')}" for n in ("address", "workers", "block_size") if getattr(args, n)]
        given += ["--gpus-per-worker"] if args.gpus_per_worker else []
        if given:
            raise UsageError(f"{given[0]}: an option of --engine ray, got --engine local")
    calibration = {"auto": "auto", "none": None}.get(args.calibration, args.calibration)
    check_out_dir(args.out, "--out")  # before the model is loaded: a wrong folder fails at once
    model = load_command_model(args.model, args)
    result = screen(model, args.data, detector=args.detector, out_dir=args.out, fpr=args.fpr,
                    threshold=args.threshold, calibration=calibration, batch_size=args.batch_size,
                    detector_options=options, top_k=args.top_k, image_size=args.image_size,
                    channels=args.in_channels, overwrite=args.restart, report=not args.no_report,
                    reference=args.reference, detector_file=args.detector_file,
                    command=shlex.join(["trojanguard", *args.argv]), engine=args.engine, ray=ray)
    _print_summary(args, result)
    return 0


def _print_summary(args: argparse.Namespace, result) -> None:
    """The run in a few lines: counts, threshold, fit warnings, chance and target sentences, timing, files."""
    from trojanguard.screening import report as reporting

    s = result.summary
    print(f"screened {s['screened']} of {s['samples']} samples from {s['data']['description']}"
          + (f" ({s['unreadable']} unreadable, listed in results.csv)" if s["unreadable"] else "")
          + (f" ({s['unscored']} not scored: non-finite detector score, listed in results.csv)" if s["unscored"] else ""))
    print(f"detector {args.detector}: {s['flagged']} flagged ({100 * s['flagged_fraction']:.2f} %) at threshold "
          f"{result.threshold:.6g} — {s['threshold']['description']}")
    fit = s.get("fit")
    if fit and fit["warnings"]:
        advice = (" — the screened data cannot support a self-fit; pass --reference DIR|.npz|digits (trusted data) "
                  "or --detector-file PATH" if fit["on"] == "screened data" else "")
        print(f"warning: detector fitted on {fit['on']} ({fit['description']}){advice}: " + "; ".join(fit["warnings"]))
    print(reporting.chance_sentence(s["clean_flags"]))
    print(reporting.target_sentence(s["target"]))
    if result.rule == "robust_z":
        print(f"note: {reporting.ROBUST_BANNER}")
    progress = s["run"]
    if progress["resumed_from"] and not progress["screened_now"]:
        print("nothing left to screen: the run in --out was complete; report rewritten")
    print(f"time: {reporting.timing_text(progress)}"
          + (f" (resumed at sample {progress['resumed_from']})"
             if progress["resumed_from"] and progress["screened_now"] else ""))
    if s.get("truth"):
        t = s["truth"]
        auroc = "n/a" if t["auroc"] is None else f"{t['auroc']:.3f}"
        print(f"truth known ({t['poisoned']} poisoned): AUROC {auroc}, precision {t['precision']:.3f}, "
              f"recall {t['recall']:.3f}")
    print(f"results: {result.results_path}")
    print(f"lists:   {result.files['flagged_list']} (flagged), {result.files['kept_list']} (kept)")
    if result.report_path is not None:
        print(f"report:  {result.report_path}")
