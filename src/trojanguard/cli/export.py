"""trojanguard export: a guard (model + one-pass detector) as one ONNX graph and/or a Triton Inference Server model
repository. The detector is the feature-space one (a classifier's guard: logits, score, flag) or PoisonCAM's poison
classifier (an encoder's guard: features, score, flag; fitted on --reference or taken from a saved fit)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

from trojanguard.cli._options import (
    UsageError,
    add_arch_option,
    add_model_input_options,
    add_model_option,
    load_command_model,
)

OUTPUTS = (("out", "file"), ("triton_repo", "folder"))
DETECTORS = ("features", "poisoncam")  # the one-pass detectors a guard graph can carry
# the names check_triton_options' errors start with -> the options that set them (errors name the option)
TRITON_ARGUMENTS = {"model_name": "--triton-name", "max_batch_size": "--max-batch-size",
                    "max_queue_delay_microseconds": "--queue-delay-us"}


def opset_arg(text: str) -> int:
    """--opset: an integer in the range export_onnx can write (checked before any fitting)."""
    from trojanguard.guard.onnx_export import check_opset

    try:
        return check_opset(int(text), "--opset")
    except ValueError as exc:
        message = str(exc) if "--opset" in str(exc) else f"expected an integer, got {text!r}"
        raise argparse.ArgumentTypeError(message.removeprefix("--opset: ")) from None


def add_parser(sub) -> None:
    from trojanguard.guard.onnx_export import DEFAULT_OPSET
    from trojanguard.guard.triton_server import (
        BACKENDS,
        DEFAULT_MAX_BATCH_SIZE,
        DEFAULT_MODEL_NAME,
        DEFAULT_QUEUE_DELAY_US,
        INSTANCE_KINDS,
        PIPELINE_MODES,
    )

    p = sub.add_parser("export", help="export a guard (model + one-pass detector) to ONNX and/or a Triton "
                                      "model repository",
                       description="Fit the detector on --reference data, calibrate its threshold on --calibration "
                                   "data, and write one ONNX graph input -> (logits, score, flagged) — or, for an "
                                   "encoder with --detector poisoncam, input -> (features, score, flagged); with "
                                   "--triton-repo also a Triton Inference Server model repository (config.pbtxt with "
                                   "dynamic batching, 1/model.onnx; --triton-backend python for a server with only "
                                   "the Python backend; --production-model to serve a model behind the guard). "
                                   "--model may also be an exported .onnx guard graph (then only the repository is "
                                   "written).")
    add_model_option(p, "model file, zoo:<attack>, ssl-zoo:<attack> (an encoder, for --detector poisoncam), or an "
                        "exported guard graph (.onnx)")
    add_arch_option(p)
    p.add_argument("--out", help="the ONNX file to write")
    p.add_argument("--detector", choices=DETECTORS, default="features",
                   help="features: the feature-space distance of a classifier (default); poisoncam: PoisonCAM's "
                        "poison classifier in front of an encoder (docs/poisoncam.md)")
    p.add_argument("--fit", help="--detector poisoncam: a saved PoisonCAM fit (screen --detector poisoncam writes "
                                 "OUT/poisoncam_fit.safetensors) instead of fitting on --reference (minutes)")
    p.add_argument("--reference", help="data the detector is fitted on (folder, .npz, digits; default for zoo models: "
                                       "their poisoned training set — the robust fit tolerates the poison; for "
                                       "ssl-zoo encoders: their poisoned unlabeled set, which PoisonCAM screens)")
    p.add_argument("--calibration", help="clean data for the threshold (folder, .npz, digits-test; default for zoo "
                                         "models: digits-test; --detector poisoncam without it: its own 0.5 rule)")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate (default 0.01)")
    p.add_argument("--threshold", type=float, help="a fixed threshold instead of calibration")
    p.add_argument("--policy", choices=("flag", "reject"), default="flag",
                   help="flag: logits unchanged (default); reject: NaN logits for flagged inputs")
    p.add_argument("--opset", type=opset_arg, default=DEFAULT_OPSET,
                   help=f"ONNX opset of the graph (default {DEFAULT_OPSET})")
    p.add_argument("--triton-repo", help="also write a Triton model repository into this folder")
    p.add_argument("--triton-name", default=DEFAULT_MODEL_NAME, help=f"model name (default {DEFAULT_MODEL_NAME})")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help=f"Triton max_batch_size (default {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                   help=f"dynamic batching max_queue_delay_microseconds (default {DEFAULT_QUEUE_DELAY_US})")
    p.add_argument("--instance-kind", choices=sorted(INSTANCE_KINDS), default="auto",
                   help="auto (Triton's placement, default), cpu or gpu")
    p.add_argument("--triton-backend", choices=BACKENDS, default="onnxruntime",
                   help="onnxruntime: Triton's ONNX Runtime backend, as in NVIDIA's containers (default); python: a "
                        "model.py running the graph with ONNX Runtime in Triton's Python backend")
    p.add_argument("--production-model",
                   help="also serve this model behind the guard: an ONNX classifier taking the same input, or a model "
                        "file / zoo:<attack> (exported to ONNX here; --arch as for --model). Adds the models "
                        "<name>_production and <name>_pipeline (guard first; --policy reject never sends a flagged "
                        "input to the production model)")
    p.add_argument("--pipeline", choices=PIPELINE_MODES, default="in_process",
                   help="in_process: the pipeline runs the guard and the production graph itself (one server hop, "
                        "default); bls: it calls the two served models (which may then run on any backend)")
    add_model_input_options(p, " for fitting")


def run(args: argparse.Namespace) -> int:
    """Fit the feature-space guard, calibrate it, export ONNX; optionally write a Triton model repository."""
    from trojanguard.guard.onnx_export import load_guard_graph

    if args.out is None and args.triton_repo is None:
        raise UsageError("--out, --triton-repo: expected --out FILE.onnx and/or --triton-repo DIR, got neither")
    if args.triton_repo is not None:
        _check_triton_arguments(args)
    if args.production_model is not None and args.triton_repo is None:
        raise UsageError(f"--production-model: it is served behind the guard in a Triton repository; expected "
                         f"--triton-repo DIR with it, got --production-model {args.production_model!r} alone")
    if args.fit is not None and args.detector != "poisoncam":
        raise UsageError(f"--fit: a saved fit is PoisonCAM's; expected --detector poisoncam with it, got --detector "
                         f"{args.detector}")
    if Path(args.model).suffix == ".onnx":  # an exported guard graph: only the Triton repository to write
        if args.triton_repo is None:
            raise UsageError("--triton-repo: --model is an .onnx file (an exported guard graph), so only a Triton "
                             "repository can be written from it; expected --triton-repo DIR, got none")
        if args.out is not None:
            raise UsageError("--out: --model is already an exported guard graph (.onnx), there is no graph to "
                             f"write; expected only --triton-repo DIR, got --out {args.out!r}")
        load_guard_graph(args.model, "--model")  # an ordinary classifier or a broken file: refused, nothing written
    with tempfile.TemporaryDirectory(prefix="trojanguard-export-") as scratch:  # graphs only the repository keeps
        _write_outputs(args, Path(scratch))
    return 0


def _write_outputs(args: argparse.Namespace, scratch: Path) -> None:
    """The guard graph (--out, or ``scratch`` when only the repository is asked for) and the repository."""
    from trojanguard.guard import write_triton_repository
    from trojanguard.guard.triton_server import PIPELINE_SUFFIX, PRODUCTION_SUFFIX

    onnx_path = Path(args.model) if Path(args.model).suffix == ".onnx" else _export_guard(args, scratch)
    if args.triton_repo is not None:
        production = None if args.production_model is None else _production_graph(args, onnx_path, scratch)
        model_dir = write_triton_repository(
            onnx_path, args.triton_repo, model_name=args.triton_name, max_batch_size=args.max_batch_size,
            max_queue_delay_microseconds=args.queue_delay_us, instance_kind=args.instance_kind,
            backend=args.triton_backend, production_model=production, pipeline=args.pipeline)
        print(f"Triton model repository: {args.triton_repo} (model {args.triton_name}: {model_dir}, backend "
              f"{args.triton_backend})")
        if production is not None:
            print(f"pipeline: {args.triton_name}{PIPELINE_SUFFIX} (the guard in front of "
                  f"{args.triton_name}{PRODUCTION_SUFFIX}, from {args.production_model})")
        print(f"serve it with: tritonserver --model-repository {Path(args.triton_repo).resolve()}")


def _production_graph(args: argparse.Namespace, guard_path: Path, scratch: Path) -> Path:
    """--production-model as an ONNX file: as given, or a model exported (into ``scratch``) for the guard graph's
    input; a model that cannot take that input is a one-line error naming the option."""
    import torch

    from trojanguard.errors import DataError
    from trojanguard.guard.onnx_export import export_model_onnx, load_guard_graph, read_metadata
    from trojanguard.guard.triton_server import graph_tensors, load_production_graph

    if Path(args.production_model).suffix == ".onnx":  # checked here, so that errors name the option
        guard_input = graph_tensors(load_guard_graph(guard_path))[0][0]
        load_production_graph(Path(args.production_model), guard_input, "--production-model")
        return Path(args.production_model)
    model = load_command_model(args.production_model, args).cpu()
    shape = read_metadata(guard_path)["input_shape"]
    try:
        return export_model_onnx(model, scratch / "production.onnx", torch.rand(2, *shape), opset=args.opset)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DataError(f"--production-model: expected a model that takes the guard's input {tuple(shape)}, got "
                        f"{args.production_model!r}, which fails on it ({type(exc).__name__}: {exc})") from None


def _check_triton_arguments(args: argparse.Namespace) -> None:
    """The Triton repository options, checked before any fitting (usage errors naming the CLI option)."""
    from trojanguard.guard.triton_server import check_triton_options

    try:
        check_triton_options(args.triton_name, args.max_batch_size, args.queue_delay_us,
                             instance_kind=args.instance_kind)
    except ValueError as exc:
        name, _, rest = str(exc).partition(": ")
        raise UsageError(f"{TRITON_ARGUMENTS.get(name, name)}: {rest}") from None


def _export_guard(args: argparse.Namespace, scratch: Path):
    """Fit, calibrate and write the guard graph (into ``scratch`` when only --triton-repo is asked for)."""
    import torch

    from trojanguard.detect import FeatureMahalanobis
    from trojanguard.detect.base import SampleSizeWarning
    from trojanguard.guard import Guard, export_onnx
    from trojanguard.screening.sources import SSL_ZOO_PREFIX, ZOO_PREFIX, SourceImages, open_source
    from trojanguard.thresholds import check_calibration_size

    poisoncam = args.detector == "poisoncam"
    zoo = args.model if args.model.startswith(ZOO_PREFIX) else None
    if args.model.startswith(SSL_ZOO_PREFIX) and not poisoncam:
        raise UsageError(f"--detector: {args.model} is an encoder (no logits), whose guard is PoisonCAM's; expected "
                         "--detector poisoncam, got --detector features")
    reference_spec = args.reference or zoo or (args.model if args.model.startswith(SSL_ZOO_PREFIX) else None)
    if reference_spec is None and not (poisoncam and args.fit is not None):
        what = ("the unlabeled set PoisonCAM is fitted on (folder, .npz), or --fit" if poisoncam else
                "the data the guard's feature statistics are fitted on (folder, .npz, digits)")
        raise UsageError(f"--reference: expected {what}, got none")
    calibration_spec = args.calibration or ("digits-test" if zoo and args.threshold is None else None)
    if calibration_spec is None and args.threshold is None and not poisoncam:
        raise UsageError("--calibration: expected clean data to set the threshold on (folder, .npz, digits-test), "
                         "or --threshold; got neither")
    model = load_command_model(args.model, args)
    reference = None if reference_spec is None else open_source(
        reference_spec, image_size=args.image_size, channels=args.in_channels, name="--reference")
    calibration = None if args.threshold is not None or calibration_spec is None else open_source(
        calibration_spec, image_size=args.image_size, channels=args.in_channels, name="--calibration")
    if calibration is not None:  # before the fit: too few clean images cannot give the asked false-positive rate
        check_calibration_size(len(calibration), args.fpr, "--calibration")
    if poisoncam:
        detector = _poisoncam_detector(model, reference, args.fit)
        model = detector.encoder  # the Encoder kind: the guard serves its features
    else:
        with warnings.catch_warnings(record=True) as caught:  # sample-size warnings become plain CLI lines
            warnings.simplefilter("always", SampleSizeWarning)
            detector = FeatureMahalanobis(model, show_progress=False).fit(SourceImages(reference))
        for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, SampleSizeWarning)):
            print(f"trojanguard export: warning: {message}", file=sys.stderr)
    guard = Guard(model, detector, threshold=args.threshold, policy=args.policy)
    if calibration is not None:
        guard.calibrate(SourceImages(calibration), fpr=args.fpr)
    if reference is not None:
        example = torch.stack(list(SourceImages(reference, limit=2)))
    else:  # a saved fit alone: its recorded input shape is the graph's
        example = torch.rand(2, *detector.input_shape)
    if args.out is not None:
        out = Path(args.out)
    else:
        out = scratch / "model.onnx"
    path = export_onnx(guard.cpu(), out, example, opset=args.opset)
    fitted_on = f"fit {args.fit}" if args.fit is not None else f"reference {reference.description}"
    print(f"guard graph: {path} ({args.detector}, threshold {guard.threshold:.6g}, policy {args.policy}, "
          f"{fitted_on})")
    return path


def _poisoncam_detector(encoder, reference, fit_path):
    """PoisonCAM on ``encoder``: loaded from a saved fit (checked to be of this encoder) or fitted on the
    reference set with its defaults (progress on stderr)."""
    from trojanguard.detect import PoisonCAM
    from trojanguard.screening.sources import SourceImages

    if fit_path is not None:
        return PoisonCAM.load(fit_path, encoder, show_progress=False)
    return PoisonCAM(encoder).fit(SourceImages(reference))
