"""The ``trojanguard`` command: ``info`` (versions, devices, backends), ``demo`` (the main job), ``screen`` (score a
dataset for poisoned samples, with a report), ``export`` (a guard as ONNX and as a Triton model repository) and
``cleanse`` (BCU on a model file with unlabeled images)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path


class UsageError(Exception):
    """A command line that cannot work, found before any work starts: one error line, exit code 2."""


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import trojanguard
    from trojanguard.ops import backend_availability

    versions = {"trojanguard": trojanguard.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "triton", "onnx", "onnxruntime", "numpy", "sklearn"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    backends = backend_availability()
    if args.json:
        print(json.dumps({"versions": versions, "devices": devices, "backends": backends}, indent=2))
        return 0
    print("versions:")
    for k, v in versions.items():
        print(f"  {k:12s} {v}")
    print("devices:  " + ", ".join(devices))
    print("backends:")
    for name, reasons in backends.items():
        print(f"  {name:10s} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    return 0


DEMO_ATTACKS = ("badnets", "blended", "sig", "wanet", "trojan")
BCU_DEFAULTS = {"epochs": 20, "lr": 0.01, "batch_size": 64, "augment": "crop"}  # = BCU()'s defaults (tested)


def cmd_demo(args: argparse.Namespace) -> int:
    """Build (or load from cache) a backdoored digits model per attack, report CA / ASR, then cleanse each
    with BCU on in-distribution unlabeled data (the clean half of its training set) and report CA / ASR after;
    end by exporting the first model's guard to ONNX and running it in ONNX Runtime."""
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    attacks = args.attacks or list(DEMO_ATTACKS)
    rows = []
    start = time.perf_counter()
    entries = []
    for name in attacks:
        entry = get_backdoored_model(ZooConfig(attack=name, arch=args.arch, seed=args.seed))
        entries.append(entry)
        rows.append((name, "none", entry.clean_accuracy, entry.attack_success_rate, "-"))
        print(f"[{time.perf_counter() - start:6.1f}s] {name}: model ready (trained in {entry.train_seconds:.1f}s)",
              file=sys.stderr)
        auroc, throughput = _demo_cd(entry)
        rows.append((name, "cd", entry.clean_accuracy, entry.attack_success_rate, f"{auroc:.3f}"))
        print(f"[{time.perf_counter() - start:6.1f}s] {name}: CD screened the training set sample at "
              f"{throughput:.1f} images/s", file=sys.stderr)
        if not args.no_bcu:
            ca, asr, seconds = _demo_bcu(entry, args)
            rows.append((name, "bcu", ca, asr, "-"))
            print(f"[{time.perf_counter() - start:6.1f}s] {name}: BCU done in {seconds:.1f}s", file=sys.stderr)
    print(f"\ntrojanguard demo — digits, {args.arch}, target class 0, zoo poison rates (see trojanguard.zoo)")
    print(f"cd: Cognitive Distillation (CD-P defaults) scoring every poisoned training image and {DEMO_CD_CLEAN} "
          "clean ones; AUROC against the true poison indices (the model itself is unchanged)")
    if not args.no_bcu:
        print("bcu: BCU with its defaults (adaptive re-initialisation + distillation) on the clean half of the "
              "training set, labels withheld")
    print(f"{'attack':10s} {'defence':12s} {'CA':>6s} {'ASR':>6s} {'AUROC':>6s}")
    for name, defence, ca, asr, auroc in rows:
        print(f"{name:10s} {defence:12s} {ca:6.3f} {asr:6.3f} {auroc:>6s}")
    _demo_guard(entries[0], Path(args.out))
    print(f"\nfinished in {time.perf_counter() - start:.1f}s")
    return 0


DEMO_GUARD_FPR = 0.05


def _demo_guard(entry, out_dir: Path) -> None:
    """The serving guard for ``entry``'s model: robust feature-space detector fitted on its (poisoned) training
    set, threshold for DEMO_GUARD_FPR on half the clean test set, one ONNX graph run by ONNX Runtime on the
    other half, clean and triggered."""
    import numpy as np

    from trojanguard.detect import FeatureMahalanobis
    from trojanguard.guard import Guard, GuardSession, export_onnx

    half = len(entry.test.x) // 2
    calibration, clean = entry.test.x[:half], entry.test.x[half:]
    triggered = entry.triggered_test()[half:][entry.test.y[half:] != entry.config.target]
    detector = FeatureMahalanobis(entry.model, show_progress=False).fit(entry.train.dataset.x)
    guard = Guard(entry.model, detector).eval()
    guard.calibrate(calibration, fpr=DEMO_GUARD_FPR)
    path = export_onnx(guard, out_dir / f"guard-{entry.config.attack}.onnx", clean[:2])
    session = GuardSession(path, providers="auto")
    on_clean, on_triggered = session.run(clean.numpy()), session.run(triggered.numpy())
    reference = guard.run(clean)
    gap = float(np.abs(on_clean.logits - reference.logits.numpy()).max())
    print(f"\nguard ({entry.config.attack} model): {path} in ONNX Runtime ({', '.join(session.providers)}); "
          f"threshold for {DEMO_GUARD_FPR:.0%} FPR on clean test images")
    print(f"flagged: clean {on_clean.flagged.mean():.3f}, triggered {on_triggered.flagged.mean():.3f}; "
          f"max |logit| gap vs PyTorch {gap:.1e}")


DEMO_CD_CLEAN = 100  # clean training images screened next to every poisoned one (keeps the demo short)


def _demo_cd(entry) -> tuple[float, float]:
    """Cognitive Distillation (defaults) on every poisoned training image plus DEMO_CD_CLEAN clean ones:
    AUROC against the true poison indices and images per second."""
    import torch

    from trojanguard.detect import CognitiveDistillation
    from trojanguard.metrics import auroc

    poisoned = entry.train.is_poisoned
    clean = torch.nonzero(~poisoned).flatten()
    clean = clean[torch.randperm(len(clean), generator=torch.Generator().manual_seed(0))[:DEMO_CD_CLEAN]]
    index = torch.cat([torch.nonzero(poisoned).flatten(), clean])
    start = time.perf_counter()
    scores = CognitiveDistillation(entry.model).score(entry.train.dataset.x[index])
    return auroc(poisoned[index], scores), len(index) / (time.perf_counter() - start)

# ---------------------------------------------------------------------------------------------------------
# screen


DEVICE_HELP = ("torch device: auto (default: cuda when torch.cuda.is_available(), else cpu), cpu, cuda or "
               "cuda:<index>")


def _device_arg(text: str) -> str:
    """--device: ``auto`` resolved to ``cuda`` when a GPU is usable, else ``cpu``; other names checked now (a usage
    error before any work, not a CUDA traceback later)."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("CUDA is not available here (no GPU / torch built without CUDA); use "
                                             "--device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"expected one of this machine's {count} CUDA device(s) (cuda:0 … "
                                             f"cuda:{count - 1}), got {text!r}")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return str(device)


def _load_cli_model(spec: str, args: argparse.Namespace):
    """A model file (safe loading; ``--arch`` for state dicts) or ``zoo:<attack>`` (the zoo's backdoored model)."""
    from trojanguard.models import load_model
    from trojanguard.screening.sources import ZOO_PREFIX, zoo_entry

    if spec.startswith(ZOO_PREFIX):
        model = zoo_entry(spec[len(ZOO_PREFIX):]).model
    else:
        model = load_model(spec, args.arch, num_classes=args.num_classes, in_channels=args.in_channels,
                           allow_pickle=args.allow_pickle)
    return model.to(args.device).eval()


IMAGE_SIZE_HELP = ("side every image is resized to, for every kind of data; default: the data's own size for .npz "
                   "arrays and zoo data, 32 for image folders, digits and ood")


def _image_size(text: str) -> int:
    """``--image-size``: a positive integer."""
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {size}")
    return size


def _option_value(text: str):
    """``KEY=VALUE`` of --detector-option: VALUE as JSON (numbers, true/false, null), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_screen(args: argparse.Namespace) -> int:
    """Screen a dataset with a detector; durable results.csv (resumable) and a report in --out."""
    from trojanguard.screening import report as reporting
    from trojanguard.screening import screen
    from trojanguard.screening.api import check_out_dir

    options = dict(args.detector_option or [])
    if args.steps is not None:
        if args.detector != "cd":
            raise UsageError(f"--steps: only for --detector cd, got --detector {args.detector}")
        options["steps"] = args.steps
    if args.detector_file is not None and args.detector != "features":
        raise UsageError(f"--detector-file: only for --detector features, got --detector {args.detector}")
    if args.reference is not None and args.detector == "cd":
        raise UsageError("--reference: cd is not fitted on data (only features, amortized), got --detector cd")
    calibration = {"auto": "auto", "none": None}.get(args.calibration, args.calibration)
    check_out_dir(args.out, "--out")  # before the model is loaded: a wrong folder fails at once
    model = _load_cli_model(args.model, args)
    result = screen(model, args.data, detector=args.detector, out_dir=args.out, fpr=args.fpr,
                    threshold=args.threshold, calibration=calibration, batch_size=args.batch_size,
                    detector_options=options, top_k=args.top_k, image_size=args.image_size,
                    channels=args.in_channels, overwrite=args.restart, report=not args.no_report,
                    reference=args.reference, detector_file=args.detector_file,
                    command=shlex.join(["trojanguard", *args.argv]))
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
    run = s["run"]
    if run["resumed_from"] and not run["screened_now"]:
        print("nothing left to screen: the run in --out was complete; report rewritten")
    print(f"time: {reporting.timing_text(run)}"
          + (f" (resumed at sample {run['resumed_from']})" if run["resumed_from"] and run["screened_now"] else ""))
    if s.get("truth"):
        t = s["truth"]
        auroc = "n/a" if t["auroc"] is None else f"{t['auroc']:.3f}"
        print(f"truth known ({t['poisoned']} poisoned): AUROC {auroc}, precision {t['precision']:.3f}, "
              f"recall {t['recall']:.3f}")
    print(f"results: {result.results_path}")
    print(f"lists:   {result.files['flagged_list']} (flagged), {result.files['kept_list']} (kept)")
    if result.report_path is not None:
        print(f"report:  {result.report_path}")
    return 0


def add_screen_parser(sub) -> None:
    from trojanguard.screening import DETECTORS

    p = sub.add_parser("screen", help="score every sample of a dataset for backdoor triggers; report in --out",
                       description="Screen a dataset for backdoor-triggered samples, batch by batch. One row per "
                                   "sample is appended durably to OUT/results.csv; run the same command again to "
                                   "resume a stopped run. The report is OUT/index.html.")
    p.add_argument("--model", required=True, help="model file (safetensors / weights-only .pt state dict, TorchScript, "
                                                  ".pt2) or zoo:<attack> (the zoo's backdoored digits model)")
    p.add_argument("--arch", help="architecture of a state-dict file: small_cnn, resnet18_cifar, torchvision:<name>")
    p.add_argument("--data", required=True, help="image folder, .npz file (x: uint8 NHWC or float NCHW, optional y), "
                                                 "digits (embedded) or zoo:<attack> (its poisoned training set)")
    p.add_argument("--detector", default="cd", choices=sorted(DETECTORS),
                   help="cd (Cognitive Distillation, default), features (feature-space Mahalanobis) or amortized")
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
    p.add_argument("--detector-option", type=_option_value, action="append", metavar="KEY=VALUE",
                   help="a detector keyword argument, e.g. mode=logits or early_stop=0.01 (repeatable)")
    p.add_argument("--top-k", type=int, default=16, help="samples in the report's grid (default 16)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of a state-dict model (default 10)")
    p.add_argument("--in-channels", type=int, default=3, help="image channels, 1 or 3 (default 3)")
    p.add_argument("--image-size", type=_image_size, help=IMAGE_SIZE_HELP)
    p.add_argument("--device", default="auto", type=_device_arg, help=DEVICE_HELP)
    p.add_argument("--restart", action="store_true", help="discard results of a different run in --out and start over")
    p.add_argument("--no-report", action="store_true", help="only results.csv (no summary, figures, HTML)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading a pickled model (runs its code!)")
    p.set_defaults(func=cmd_screen)


# ---------------------------------------------------------------------------------------------------------
# export


def cmd_export(args: argparse.Namespace) -> int:
    """Fit the feature-space guard, calibrate it, export ONNX; optionally write a Triton model repository."""
    from trojanguard.guard import write_triton_repository
    from trojanguard.guard.onnx_export import load_guard_graph

    if args.out is None and args.triton_repo is None:
        raise UsageError("--out, --triton-repo: expected --out FILE.onnx and/or --triton-repo DIR, got neither")
    if args.triton_repo is not None:
        _check_triton_arguments(args)
    if Path(args.model).suffix == ".onnx":  # an exported guard graph: only the Triton repository to write
        if args.triton_repo is None:
            raise UsageError("--triton-repo: --model is an .onnx file (an exported guard graph), so only a Triton "
                             "repository can be written from it; expected --triton-repo DIR, got none")
        if args.out is not None:
            raise UsageError("--out: --model is already an exported guard graph (.onnx), there is no graph to "
                             f"write; expected only --triton-repo DIR, got --out {args.out!r}")
        load_guard_graph(args.model, "--model")  # an ordinary classifier or a broken file: refused, nothing written
        onnx_path = Path(args.model)
    else:
        onnx_path = _export_guard(args)
    if args.triton_repo is not None:
        model_dir = write_triton_repository(
            onnx_path, args.triton_repo, model_name=args.triton_name, max_batch_size=args.max_batch_size,
            max_queue_delay_microseconds=args.queue_delay_us, instance_kind=args.instance_kind)
        print(f"Triton model repository: {args.triton_repo} (model {args.triton_name}: {model_dir})")
        print(f"serve it with: tritonserver --model-repository {Path(args.triton_repo).resolve()}")
    return 0


TRITON_ARGUMENTS = {"model_name": "--triton-name", "max_batch_size": "--max-batch-size",
                    "max_queue_delay_microseconds": "--queue-delay-us"}


def _check_triton_arguments(args: argparse.Namespace) -> None:
    """The Triton repository options, checked before any fitting (usage errors naming the CLI option)."""
    from trojanguard.guard.triton_server import check_triton_options

    try:
        check_triton_options(args.triton_name, args.max_batch_size, args.queue_delay_us,
                             instance_kind=args.instance_kind)
    except ValueError as exc:
        name, _, rest = str(exc).partition(": ")
        raise UsageError(f"{TRITON_ARGUMENTS.get(name, name)}: {rest}") from None


def _export_guard(args: argparse.Namespace):
    import tempfile

    import torch

    from trojanguard.detect import FeatureMahalanobis
    from trojanguard.detect.base import SampleSizeWarning, check_calibration_size
    from trojanguard.guard import Guard, export_onnx
    from trojanguard.screening.sources import ZOO_PREFIX, SourceImages, open_source

    zoo = args.model if args.model.startswith(ZOO_PREFIX) else None
    reference_spec = args.reference or zoo
    if reference_spec is None:
        raise UsageError("--reference: expected the data the guard's feature statistics are fitted on (folder, "
                         ".npz, digits), got none")
    calibration_spec = args.calibration or ("digits-test" if zoo and args.threshold is None else None)
    if calibration_spec is None and args.threshold is None:
        raise UsageError("--calibration: expected clean data to set the threshold on (folder, .npz, digits-test), "
                         "or --threshold; got neither")
    model = _load_cli_model(args.model, args)
    reference = open_source(reference_spec, image_size=args.image_size, channels=args.in_channels, name="--reference")
    calibration = None if args.threshold is not None else open_source(
        calibration_spec, image_size=args.image_size, channels=args.in_channels, name="--calibration")
    if calibration is not None:  # before the fit: too few clean images cannot give the asked false-positive rate
        check_calibration_size(len(calibration), args.fpr, "--calibration")
    with warnings.catch_warnings(record=True) as caught:  # sample-size warnings become plain CLI lines
        warnings.simplefilter("always", SampleSizeWarning)
        detector = FeatureMahalanobis(model, show_progress=False).fit(SourceImages(reference))
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, SampleSizeWarning)):
        print(f"trojanguard export: warning: {message}", file=sys.stderr)
    guard = Guard(model, detector, threshold=args.threshold, policy=args.policy)
    if calibration is not None:
        guard.calibrate(SourceImages(calibration), fpr=args.fpr)
    example = torch.stack(list(SourceImages(reference, limit=2)))
    if args.out is not None:
        out = Path(args.out)
    else:
        out = Path(tempfile.mkdtemp(prefix="trojanguard-export-")) / "model.onnx"
    path = export_onnx(guard.cpu(), out, example, opset=args.opset)
    print(f"guard graph: {path} (threshold {guard.threshold:.6g}, policy {args.policy}, reference "
          f"{reference.description})")
    return path


def _opset_arg(text: str) -> int:
    """--opset: an integer in the range export_onnx can write (checked before any fitting)."""
    from trojanguard.guard.onnx_export import check_opset

    try:
        return check_opset(int(text), "--opset")
    except ValueError as exc:
        message = str(exc) if "--opset" in str(exc) else f"expected an integer, got {text!r}"
        raise argparse.ArgumentTypeError(message.removeprefix("--opset: ")) from None


def add_export_parser(sub) -> None:
    from trojanguard.guard.onnx_export import DEFAULT_OPSET
    from trojanguard.guard.triton_server import (
        DEFAULT_MAX_BATCH_SIZE,
        DEFAULT_MODEL_NAME,
        DEFAULT_QUEUE_DELAY_US,
        INSTANCE_KINDS,
    )

    p = sub.add_parser("export", help="export a guard (model + feature-space detector) to ONNX and/or a Triton "
                                      "model repository",
                       description="Fit the feature-space detector on --reference data, calibrate its threshold on "
                                   "--calibration data, and write one ONNX graph input -> (logits, score, flagged); "
                                   "with --triton-repo also a Triton Inference Server model repository "
                                   "(config.pbtxt with dynamic batching, 1/model.onnx). --model may also be an "
                                   "exported .onnx guard graph (then only the repository is written).")
    p.add_argument("--model", required=True, help="model file, zoo:<attack>, or an exported guard graph (.onnx)")
    p.add_argument("--arch", help="architecture of a state-dict file: small_cnn, resnet18_cifar, torchvision:<name>")
    p.add_argument("--out", help="the ONNX file to write")
    p.add_argument("--reference", help="data the detector is fitted on (folder, .npz, digits; default for zoo models: "
                                       "their poisoned training set — the robust fit tolerates the poison)")
    p.add_argument("--calibration", help="clean data for the threshold (folder, .npz, digits-test; default for zoo "
                                         "models: digits-test)")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate (default 0.01)")
    p.add_argument("--threshold", type=float, help="a fixed threshold instead of calibration")
    p.add_argument("--policy", choices=("flag", "reject"), default="flag",
                   help="flag: logits unchanged (default); reject: NaN logits for flagged inputs")
    p.add_argument("--opset", type=_opset_arg, default=DEFAULT_OPSET,
                   help=f"ONNX opset of the graph (default {DEFAULT_OPSET})")
    p.add_argument("--triton-repo", help="also write a Triton model repository into this folder")
    p.add_argument("--triton-name", default=DEFAULT_MODEL_NAME, help=f"model name (default {DEFAULT_MODEL_NAME})")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help=f"Triton max_batch_size (default {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                   help=f"dynamic batching max_queue_delay_microseconds (default {DEFAULT_QUEUE_DELAY_US})")
    p.add_argument("--instance-kind", choices=sorted(INSTANCE_KINDS), default="auto",
                   help="auto (Triton's placement, default), cpu or gpu")
    p.add_argument("--num-classes", type=int, default=10, help="classes of a state-dict model (default 10)")
    p.add_argument("--in-channels", type=int, default=3, help="image channels, 1 or 3 (default 3)")
    p.add_argument("--image-size", type=_image_size, help=IMAGE_SIZE_HELP)
    p.add_argument("--device", default="auto", type=_device_arg, help=DEVICE_HELP + " for fitting")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading a pickled model (runs its code!)")
    p.set_defaults(func=cmd_export)


def _demo_bcu(entry, args: argparse.Namespace) -> tuple[float, float, float]:
    from trojanguard.cleanse import BCU
    from trojanguard.cleanse.sources import clean_half
    from trojanguard.metrics import attack_success_rate, clean_accuracy
    from trojanguard.models import build_model

    shape = entry.test.x.shape
    bcu = BCU(seed=args.seed, show_progress=True,
              init=lambda: build_model(args.arch, num_classes=entry.test.num_classes, in_channels=shape[1]))
    cleansed = bcu.cleanse(entry.model, clean_half(entry, seed=args.seed))
    ca = clean_accuracy(cleansed, entry.test.x, entry.test.y)
    asr = attack_success_rate(cleansed, entry.triggered_test(), entry.test.y, entry.config.target)
    return ca, asr, bcu.report.seconds


# ---------------------------------------------------------------------------------------------------------
# cleanse

CLEANSE_OUT_SUFFIXES = (".safetensors", ".pt")


def _load_cleanse_data(spec: str, args: argparse.Namespace, model, info: dict):
    """``ood`` (natural-photo crops adapted to ``model``, see :func:`trojanguard.cleanse.sources.ood_images`;
    ``info`` receives the chosen view), ``digits`` (half of the embedded training split), a folder or an .npz."""
    from trojanguard.cleanse.sources import ood_images
    from trojanguard.data import load_digits, load_image_folder, load_npz
    from trojanguard.data.core import DEFAULT_IMAGE_SIZE

    if spec == "ood":
        return ood_images(args.ood_images, size=args.image_size or DEFAULT_IMAGE_SIZE, channels=args.in_channels,
                          seed=args.seed, model=model, info=info)
    if spec == "digits":
        train, _ = load_digits(size=args.image_size or DEFAULT_IMAGE_SIZE, channels=args.in_channels, seed=args.seed)
        import torch

        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
        return train.x[order[: len(train) // 2]]
    path = Path(spec)
    if path.suffix.lower() == ".npz":
        return load_npz(path, size=args.image_size).x
    return load_image_folder(path, size=args.image_size, channels=args.in_channels).x


def cmd_cleanse(args: argparse.Namespace) -> int:
    """Cleanse a model file with BCU on unlabeled images; save the model (safetensors) and the JSON report."""
    from trojanguard.cleanse import BCU
    from trojanguard.models import build_model, load_model, save_model

    out = Path(args.out)
    if out.suffix not in CLEANSE_OUT_SUFFIXES:
        raise UsageError(f"--out: expected a path ending in {' or '.join(CLEANSE_OUT_SUFFIXES)} (weights only, never "
                         f"a pickled module), got {str(out)!r}")
    if args.attack is not None and args.eval is None:
        raise UsageError(f"--attack: reports ASR on --eval data; expected --eval with it, got --attack {args.attack} "
                         "alone")
    if args.target is not None and args.attack is None:
        raise UsageError(f"--target: the target class of --attack; expected --attack with it, got --target "
                         f"{args.target} alone")
    model = load_model(args.model, args.arch, num_classes=args.num_classes, in_channels=args.in_channels,
                       allow_pickle=args.allow_pickle).to(args.device)
    evaluation = None if args.eval is None else _cleanse_evaluation(args, model)
    ood_info: dict = {}
    data = _load_cleanse_data(args.data, args, model, ood_info)
    print(f"cleansing {args.model} ({args.arch}) with BCU on {len(data)} unlabeled images from {args.data!r}",
          file=sys.stderr)
    bcu = BCU(reinit=args.reinit,
              epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
              augment=args.augment, norm_stats=args.norm_stats, loss=args.loss,
              init=lambda: build_model(args.arch, num_classes=args.num_classes, in_channels=args.in_channels))
    cleansed = bcu.cleanse(model, data, evaluation=evaluation)
    save_model(cleansed, out)
    report_path = out.with_name(out.stem + ".report.json")
    bcu.report.details["model"] = str(args.model)
    bcu.report.details["data"] = str(args.data)
    if ood_info:
        bcu.report.details["ood"] = ood_info
    bcu.report.to_json(report_path)
    print(bcu.report.format())
    print(f"cleansed model: {out}\nreport:         {report_path}")
    return 0


def _cleanse_evaluation(args: argparse.Namespace, model):
    """The labelled --eval data (with the --attack trigger) as an Evaluation, checked against ``model``'s
    classes: labels and --target outside them are refused before any cleansing."""
    import torch

    from trojanguard.attacks import make_attack
    from trojanguard.cleanse import Evaluation
    from trojanguard.cleanse.base import model_device, preflight
    from trojanguard.data import load_digits, load_image_folder, load_npz
    from trojanguard.data.core import DEFAULT_IMAGE_SIZE
    from trojanguard.errors import DataError
    from trojanguard.zoo import ZOO_ATTACK_DEFAULTS

    where = f"--eval {args.eval!r}"
    if args.eval == "digits":
        labelled = load_digits(size=args.image_size or DEFAULT_IMAGE_SIZE, channels=args.in_channels, seed=args.seed)[1]
    elif Path(args.eval).suffix.lower() == ".npz":
        labelled = load_npz(args.eval, size=args.image_size)
    else:
        labelled = load_image_folder(args.eval, size=args.image_size, channels=args.in_channels)
    if labelled.y is None:
        raise DataError(f"{where}: evaluation data needs labels (class sub-folders or an npz 'y')")
    was_training = model.training
    try:
        with torch.no_grad():
            classes = preflight(model.eval(), labelled.x[:2], model_device(model))
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    finally:
        model.train(was_training)
    outside = sorted({int(label) for label in labelled.y.unique() if not 0 <= int(label) < classes})
    if outside:
        shown = ", ".join(map(str, outside[:5])) + (", ..." if len(outside) > 5 else "")
        raise DataError(f"{where}: expected labels of the model's {classes} classes (0 … {classes - 1}), got "
                        f"labels {shown}")
    trigger, target = None, None
    if args.attack is not None:
        target = 0 if args.target is None else args.target
        if not 0 <= target < classes:
            raise UsageError(f"--target: expected a class of the model (0 … {classes - 1}), got {target}")
        trigger = make_attack(args.attack, **ZOO_ATTACK_DEFAULTS.get(args.attack, {}))
    return Evaluation(labelled.x, labelled.y, trigger, target)


def _reinit_arg(text: str) -> str | float:
    if text in ("adaptive", "authors", "uniform", "none"):
        return text
    try:
        ratio = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected adaptive, authors, uniform, none or a ratio in [0, 1], got {text!r}") from None
    if not 0 <= ratio <= 1:
        raise argparse.ArgumentTypeError(f"a ratio must lie in [0, 1], got {ratio}")
    return ratio


def add_cleanse_parser(sub) -> None:
    from trojanguard.attacks import ATTACKS
    from trojanguard.cleanse.sources import DEFAULT_OOD_IMAGES

    p = sub.add_parser("cleanse", help="cleanse a suspicious model with BCU on unlabeled images",
                       description="Cleanse a suspicious classifier with BCU (re-initialise part of its weights by "
                                   "depth, distil it from itself on unlabeled images). Writes the cleansed weights "
                                   "(safetensors) and a JSON report next to them.")
    p.add_argument("--model", required=True, help="model file (safetensors / weights-only .pt state dict, ...)")
    p.add_argument("--arch", required=True, help="architecture: small_cnn, resnet18_cifar or torchvision:<name>")
    p.add_argument("--data", required=True,
                   help="unlabeled images: an image folder, an .npz, 'ood' (natural-photo crops adapted to the "
                        "model) or 'digits'")
    p.add_argument("--out", required=True, help="where to write the cleansed weights (.safetensors or .pt)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--image-size", type=_image_size, help=IMAGE_SIZE_HELP)
    p.add_argument("--ood-images", type=int, default=DEFAULT_OOD_IMAGES,
                   help=f"images to draw with --data ood (default {DEFAULT_OOD_IMAGES})")
    p.add_argument("--reinit", default="adaptive", type=_reinit_arg,
                   help="re-initialisation rule: adaptive (default), authors, uniform, none, or one ratio in [0, 1]")
    p.add_argument("--epochs", type=int, default=BCU_DEFAULTS["epochs"])
    p.add_argument("--lr", type=float, default=BCU_DEFAULTS["lr"])
    p.add_argument("--batch-size", type=int, default=BCU_DEFAULTS["batch_size"])
    p.add_argument("--augment", default=BCU_DEFAULTS["augment"], choices=("crop", "crop_flip", "none"),
                   help="crop (default), crop_flip (natural images only: flipping changes digits, text, signs), none")
    p.add_argument("--norm-stats", default="auto", choices=("auto", "update", "keep"),
                   help="batch-norm statistics: auto (default: keep the model's when the data is far from its "
                        "training distribution, else re-estimate), update or keep")
    p.add_argument("--loss", default="auto", choices=("auto", "kl", "mse"),
                   help="distillation loss: auto (default: logit MSE on far data, else KL), kl or mse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", help="labelled data to report CA per epoch: an image folder, an .npz or 'digits'")
    p.add_argument("--attack", choices=sorted(ATTACKS), help="with --eval: trigger to report ASR per epoch")
    p.add_argument("--target", type=int, help="with --attack: the attack's target class (default 0)")
    p.add_argument("--device", default="auto", type=_device_arg, help=DEVICE_HELP + " for the distillation")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading a pickled model (runs its code!)")
    p.set_defaults(func=cmd_cleanse)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trojanguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print versions, devices and available op backends")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="run every defence on backdoored models of the embedded digits data")
    demo.add_argument("--attacks", nargs="+", choices=DEMO_ATTACKS, help="attacks to run (default: all)")
    demo.add_argument("--arch", default="small_cnn", help="model architecture (default: small_cnn)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="trojanguard-out", help="where the demo writes the guard's ONNX graph")
    demo.add_argument("--no-bcu", action="store_true", help="skip the BCU cleansing rows")
    demo.set_defaults(func=cmd_demo)
    add_screen_parser(sub)
    add_export_parser(sub)
    add_cleanse_parser(sub)
    return parser


# the outputs each command writes, checked before any work: (argument's dest, "file" or "folder")
COMMAND_OUTPUTS = {"demo": (("out", "folder"),), "screen": (("out", "folder"),),
                   "export": (("out", "file"), ("triton_repo", "folder")), "cleanse": (("out", "file"),)}
DEBUG_ENV = "TROJANGUARD_DEBUG"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure ends in one line on standard error: ``trojanguard <command>: error: ...``
    (exit 2 for a command line that cannot work, 1 for bad data, model or file) or, for a bug,
    ``... internal error: ...`` (exit 1; TROJANGUARD_DEBUG=1 re-raises it with its traceback)."""
    from trojanguard.errors import TrojanGuardError

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv  # the exact command line, for reports
    command = f"trojanguard {args.command}"
    try:
        for dest, kind in COMMAND_OUTPUTS.get(args.command, ()):
            if getattr(args, dest, None) is not None:
                _check_output(getattr(args, dest), "--" + dest.replace("_", "-"), kind)
        return args.func(args)
    except UsageError as exc:
        return _print_error(command, str(exc), 2)
    except (TrojanGuardError, ValueError) as exc:  # ValueError: argument checks of the library (names the argument)
        return _print_error(command, str(exc) or type(exc).__name__, 1)
    except OSError as exc:
        return _print_error(command, _os_error_text(exc, args), 1)
    except KeyboardInterrupt:
        print(f"{command}: interrupted (finished work is kept; run the same command again to resume where it "
              "can)", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"{command}: internal error: {type(exc).__name__}: {_one_line(str(exc))} (set {DEBUG_ENV}=1 for "
              "the traceback; please report it)", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _print_error(command: str, message: str, code: int) -> int:
    print(f"{command}: error: {_one_line(message)}", file=sys.stderr)
    return code


def _os_error_text(exc: OSError, args: argparse.Namespace) -> str:
    """``<argument> <file>: <reason>`` of an OSError (never a bare ``[Errno N]``); the argument when one of the
    command's path arguments is the file or a folder above it."""
    if exc.filename is None:
        return exc.strerror or str(exc) or type(exc).__name__
    path = Path(os.fsdecode(exc.filename))
    argument = next((f"--{dest.replace('_', '-')} " for dest, value in sorted(vars(args).items())
                     if isinstance(value, str) and value and (path == Path(value) or Path(value) in path.parents)),
                    "")
    where = f"{argument}{str(path)!r}" + (f" -> {os.fsdecode(exc.filename2)!r}" if exc.filename2 else "")
    return f"{where}: {exc.strerror or exc}"


def _check_output(text: str, argument: str, kind: str) -> None:
    """An output path the command can write (checked before any work): a ``kind`` ("file" or "folder") that is
    not the other kind, inside a folder this process may write to."""
    path = Path(text)
    if path.exists():
        if kind == "folder" and not path.is_dir():
            raise UsageError(f"{argument}: expected a folder (existing or new), got the file {text!r}")
        if kind == "file" and path.is_dir():
            raise UsageError(f"{argument}: expected a file to write, got the folder {text!r}")
        folder = path if kind == "folder" else path.absolute().parent
    else:
        folder = next(p for p in path.absolute().parents if p.exists())
        if not folder.is_dir():
            raise UsageError(f"{argument}: expected a path that can be created, got {text!r} ({str(folder)!r} is a "
                             "file)")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.is_file() and not os.access(path, os.W_OK)):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), text)


if __name__ == "__main__":
    sys.exit(main())
