"""The ``trojanguard`` command: ``info`` (versions, devices, backends) and ``demo`` (the main job)."""

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


def cmd_demo(args: argparse.Namespace) -> int:
    """Build (or load from cache) a backdoored digits model per attack, report CA / ASR, and screen its
    training set with Cognitive Distillation (AUROC, images/s)."""
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    attacks = args.attacks or list(DEMO_ATTACKS)
    rows = []
    start = time.perf_counter()
    for name in attacks:
        entry = get_backdoored_model(ZooConfig(attack=name, arch=args.arch, seed=args.seed))
        rows.append((name, "none", entry.clean_accuracy, entry.attack_success_rate, "-"))
        print(f"[{time.perf_counter() - start:6.1f}s] {name}: model ready (trained in {entry.train_seconds:.1f}s)",
              file=sys.stderr)
        auroc, throughput = _demo_cd(entry)
        rows.append((name, "cd", entry.clean_accuracy, entry.attack_success_rate, f"{auroc:.3f}"))
        print(f"[{time.perf_counter() - start:6.1f}s] {name}: CD screened the training set sample at "
              f"{throughput:.1f} images/s", file=sys.stderr)
    print(f"\ntrojanguard demo — digits, {args.arch}, target class 0, zoo poison rates (see trojanguard.zoo)")
    print(f"cd: Cognitive Distillation (CD-P defaults) scoring every poisoned training image and {DEMO_CD_CLEAN} "
          "clean ones; AUROC against the true poison indices (the model itself is unchanged)")
    print(f"{'attack':10s} {'defence':12s} {'CA':>6s} {'ASR':>6s} {'AUROC':>6s}")
    for name, defence, ca, asr, auroc in rows:
        print(f"{name:10s} {defence:12s} {ca:6.3f} {asr:6.3f} {auroc:>6s}")
    print(f"\nfinished in {time.perf_counter() - start:.1f}s")
    return 0


DEMO_CD_CLEAN = 100  # clean training images screened next to every poisoned one (keeps the demo short)


def _demo_cd(entry) -> tuple[float, float]:  # noqa: ANN001
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
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
