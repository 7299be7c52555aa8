"""The ``trojanguard`` command: ``info`` (versions, devices, backends), ``demo`` (the main job) and
``cleanse`` (BCU on a model file with unlabeled images)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time


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
    with BCU on in-distribution unlabeled data (the clean half of its training set) and report CA / ASR after."""
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    attacks = args.attacks or list(DEMO_ATTACKS)
    rows = []
    start = time.perf_counter()
    for name in attacks:
        entry = get_backdoored_model(ZooConfig(attack=name, arch=args.arch, seed=args.seed))
        rows.append((name, "none", entry.clean_accuracy, entry.attack_success_rate, "-"))
        auroc, throughput = _demo_cd(entry)
        rows.append((name, "cd", entry.clean_accuracy, entry.attack_success_rate, f"{auroc:.3f}"))
        print(f"[{time.perf_counter() - start:6.1f}s] {name}: CD screened the training set sample at "
              f"{throughput:.1f} images/s", file=sys.stderr)
        print(f"[{time.perf_counter() - start:6.1f}s] {name}: model ready (trained in {entry.train_seconds:.1f}s)",
              file=sys.stderr)
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
    print(f"\nfinished in {time.perf_counter() - start:.1f}s")
    return 0


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
    from pathlib import Path

    from trojanguard.cleanse.sources import ood_images
    from trojanguard.data import load_digits, load_image_folder, load_npz

    if spec == "ood":
        return ood_images(args.ood_images, size=args.image_size, channels=args.in_channels, seed=args.seed,
                          model=model, info=info)
    if spec == "digits":
        train, _ = load_digits(size=args.image_size, channels=args.in_channels, seed=args.seed)
        import torch

        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
        return train.x[order[: len(train) // 2]]
    path = Path(spec)
    if path.suffix == ".npz":
        return load_npz(path).x
    return load_image_folder(path, size=args.image_size, channels=args.in_channels).x


def cmd_cleanse(args: argparse.Namespace) -> int:
    """Cleanse a model file with BCU on unlabeled images; save the model (safetensors) and the JSON report."""
    from pathlib import Path

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
    from pathlib import Path

    from trojanguard.attacks import make_attack
    from trojanguard.cleanse import Evaluation
    from trojanguard.data import load_digits, load_image_folder, load_npz
    from trojanguard.errors import DataError
    from trojanguard.zoo import ZOO_ATTACK_DEFAULTS

    if args.eval == "digits":
        labelled = load_digits(size=args.image_size, channels=args.in_channels, seed=args.seed)[1]
    elif Path(args.eval).suffix == ".npz":
        labelled = load_npz(args.eval)
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
    p.add_argument("--image-size", type=int, default=32, help="side the data is resized to (default 32)")
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
    demo.add_argument("--no-bcu", action="store_true", help="skip the BCU cleansing rows")
    demo.set_defaults(func=cmd_demo)
    add_cleanse_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
