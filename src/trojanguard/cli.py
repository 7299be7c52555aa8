"""The ``trojanguard`` command: ``info`` (versions, devices, backends), ``demo`` (the main job), ``screen`` (score a
dataset for poisoned samples, with a report), ``export`` (a guard as ONNX and as a Triton model repository) and
``cleanse`` (BCU on a model file with unlabeled images)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


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
    from trojanguard.errors import TrojanGuardError
    from trojanguard.screening import screen

    options = dict(args.detector_option or [])
    if args.steps is not None:
        if args.detector != "cd":
            print("trojanguard screen: error: --steps: only for --detector cd", file=sys.stderr)
            return 2
        options["steps"] = args.steps
    calibration = {"auto": "auto", "none": None}.get(args.calibration, args.calibration)
    try:
        model = _load_cli_model(args.model, args)
        result = screen(model, args.data, detector=args.detector, out_dir=args.out, fpr=args.fpr,
                        threshold=args.threshold, calibration=calibration, batch_size=args.batch_size,
                        detector_options=options, top_k=args.top_k, image_size=args.image_size,
                        channels=args.in_channels, overwrite=args.restart, report=not args.no_report)
    except (TrojanGuardError, ValueError, OSError) as exc:
        print(f"trojanguard screen: error: {exc}", file=sys.stderr)
        return 1
    s = result.summary
    print(f"screened {s['screened']} of {s['samples']} samples from {s['data']['description']}"
          + (f" ({s['unreadable']} unreadable, listed in results.csv)" if s["unreadable"] else "")
          + (f" ({s['unscored']} not scored: non-finite detector score, listed in results.csv)" if s["unscored"] else ""))
    print(f"detector {args.detector}: {s['flagged']} flagged ({100 * s['flagged_fraction']:.2f} %) at threshold "
          f"{result.threshold:.6g} — {s['threshold']['description']}")
    run = s["run"]
    if run["images_per_second"]:
        print(f"throughput: {run['images_per_second']:.2f} images/s ({run['screened_now']} images in "
              f"{run['seconds']:.1f} s" + (f", resumed at sample {run['resumed_from']})" if run["resumed_from"] else ")"))
    elif run["resumed_from"]:
        print("nothing left to screen: the run in --out was complete; report rewritten")
    if s.get("truth"):
        t = s["truth"]
        auroc = "n/a" if t["auroc"] is None else f"{t['auroc']:.3f}"
        print(f"truth known ({t['poisoned']} poisoned): AUROC {auroc}, precision {t['precision']:.3f}, "
              f"recall {t['recall']:.3f}")
    print(f"results: {result.results_path}")
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
    p.add_argument("--out", required=True, help="output folder: results.csv, calibration.csv and the report")
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
    p.add_argument("--device", default="cpu", help="torch device of the model (default cpu)")
    p.add_argument("--restart", action="store_true", help="discard results of a different run in --out and start over")
    p.add_argument("--no-report", action="store_true", help="only results.csv (no summary, figures, HTML)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading a pickled model (runs its code!)")
    p.set_defaults(func=cmd_screen)


# ---------------------------------------------------------------------------------------------------------
# export


def cmd_export(args: argparse.Namespace) -> int:
    """Fit the feature-space guard, calibrate it, export ONNX; optionally write a Triton model repository."""
    from trojanguard.errors import TrojanGuardError
    from trojanguard.guard import write_triton_repository

    if args.out is None and args.triton_repo is None:
        print("trojanguard export: error: pass --out FILE.onnx and/or --triton-repo DIR", file=sys.stderr)
        return 2
    try:
        if Path(args.model).suffix == ".onnx":  # an exported guard graph: only the Triton repository to write
            if args.triton_repo is None:
                raise ValueError("--model is already an ONNX graph: pass --triton-repo DIR to serve it with Triton")
            onnx_path = Path(args.model)
        else:
            onnx_path = _export_guard(args)
        if args.triton_repo is not None:
            model_dir = write_triton_repository(
                onnx_path, args.triton_repo, model_name=args.triton_name, max_batch_size=args.max_batch_size,
                max_queue_delay_microseconds=args.queue_delay_us, instance_kind=args.instance_kind)
            print(f"Triton model repository: {args.triton_repo} (model {args.triton_name}: {model_dir})")
            print(f"serve it with: tritonserver --model-repository {Path(args.triton_repo).resolve()}")
    except (TrojanGuardError, ValueError, OSError) as exc:
        print(f"trojanguard export: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _export_guard(args: argparse.Namespace):
    import tempfile

    import torch

    from trojanguard.detect import FeatureMahalanobis
    from trojanguard.guard import Guard, export_onnx
    from trojanguard.screening.sources import ZOO_PREFIX, SourceImages, open_source

    zoo = args.model if args.model.startswith(ZOO_PREFIX) else None
    reference_spec = args.reference or zoo
    if reference_spec is None:
        raise ValueError("--reference: the data the guard's feature statistics are fitted on (folder, .npz, digits)")
    calibration_spec = args.calibration or ("digits-test" if zoo and args.threshold is None else None)
    if calibration_spec is None and args.threshold is None:
        raise ValueError("--calibration: clean data to set the threshold on (folder, .npz, digits-test), or "
                         "--threshold")
    model = _load_cli_model(args.model, args)
    reference = open_source(reference_spec, image_size=args.image_size, channels=args.in_channels)
    detector = FeatureMahalanobis(model, show_progress=False).fit(SourceImages(reference))
    guard = Guard(model, detector, threshold=args.threshold, policy=args.policy)
    if args.threshold is None:
        calibration = open_source(calibration_spec, image_size=args.image_size, channels=args.in_channels)
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


def add_export_parser(sub) -> None:
    from trojanguard.guard.triton import (
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
    p.add_argument("--opset", type=int, default=17)
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
    p.add_argument("--device", default="cpu", help="torch device for fitting (default cpu)")
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
    from trojanguard.errors import TrojanGuardError
    from trojanguard.models import build_model, load_model, save_model

    out = Path(args.out)
    if out.suffix not in CLEANSE_OUT_SUFFIXES:
        print(f"trojanguard cleanse: error: --out: expected a path ending in {' or '.join(CLEANSE_OUT_SUFFIXES)} "
              f"(weights only, never a pickled module), got {str(out)!r}", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model, args.arch, num_classes=args.num_classes, in_channels=args.in_channels,
                           allow_pickle=args.allow_pickle)
        ood_info: dict = {}
        data = _load_cleanse_data(args.data, args, model, ood_info)
        evaluation = None
        if args.eval is not None:
            evaluation = _cleanse_evaluation(args)
        print(f"cleansing {args.model} ({args.arch}) with BCU on {len(data)} unlabeled images from {args.data!r}",
              file=sys.stderr)
        bcu = BCU(reinit=args.reinit,
                  epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                  augment=args.augment, norm_stats=args.norm_stats, loss=args.loss,
                  init=lambda: build_model(args.arch, num_classes=args.num_classes, in_channels=args.in_channels))
        cleansed = bcu.cleanse(model, data, evaluation=evaluation)
    except (TrojanGuardError, ValueError, OSError) as exc:
        print(f"trojanguard cleanse: error: {exc}", file=sys.stderr)
        return 1
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


def _cleanse_evaluation(args: argparse.Namespace):
    from trojanguard.attacks import make_attack
    from trojanguard.cleanse import Evaluation
    from trojanguard.data import load_digits, load_image_folder, load_npz
    from trojanguard.data.core import DEFAULT_IMAGE_SIZE
    from trojanguard.errors import DataError
    from trojanguard.zoo import ZOO_ATTACK_DEFAULTS

    if args.eval == "digits":
        labelled = load_digits(size=args.image_size or DEFAULT_IMAGE_SIZE, channels=args.in_channels, seed=args.seed)[1]
    elif Path(args.eval).suffix.lower() == ".npz":
        labelled = load_npz(args.eval, size=args.image_size)
    else:
        labelled = load_image_folder(args.eval, size=args.image_size, channels=args.in_channels)
    if labelled.y is None:
        raise DataError(f"--eval {args.eval!r}: evaluation data needs labels (class sub-folders or an npz 'y')")
    trigger = None
    if args.attack is not None:
        trigger = make_attack(args.attack, **ZOO_ATTACK_DEFAULTS.get(args.attack, {}))
    return Evaluation(labelled.x, labelled.y, trigger, args.target if trigger is not None else None)


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
    p.add_argument("--target", type=int, default=0, help="with --attack: the attack's target class (default 0)")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
