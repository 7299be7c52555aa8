"""trojanguard info: versions, devices and which op backends can run here (and why not)."""

from __future__ import annotations

import argparse
import json
import platform

OUTPUTS: tuple[tuple[str, str], ...] = ()


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="print versions, devices and available op backends")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    import torch

    import trojanguard
    from trojanguard.ops import backend_availability, op_backend_availability

    versions = {"trojanguard": trojanguard.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "triton", "onnx", "onnxruntime", "numpy", "sklearn"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    from importlib import metadata

    for name in ("ray", "tritonclient"):  # optional extras, read without importing them (Ray's import is slow)
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    from trojanguard.guard.triton_runtime import find_server_home, unavailable_reason

    reason = unavailable_reason()
    server = f"{find_server_home()} (Python backend)" if reason is None else f"unavailable: {reason}"
    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    backends, ops = backend_availability(), op_backend_availability()
    if args.json:
        print(json.dumps({"versions": versions, "devices": devices, "backends": backends, "ops": ops,
                          "tritonserver": server}, indent=2))
        return 0
    print("versions:")
    for k, v in versions.items():
        print(f"  {k:12s} {v}")
    print("devices:  " + ", ".join(devices))
    print(f"tritonserver: {server}")
    print("backends:")
    for name, reasons in backends.items():
        print(f"  {name:10s} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    print("ops (backends in the op's order of preference):")
    width = max(map(len, ops), default=10)
    for op, by_backend in ops.items():
        usable = [name for name, reasons in by_backend.items() if not reasons]
        print(f"  {op:{width}s} {', '.join(usable)}")
    return 0
