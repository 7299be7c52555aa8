"""Serving latency and throughput on a real Triton Inference Server (loopback HTTP, tritonclient): the production
model alone vs the same model behind the feature guard — the guard graph alone (the guarded model's own logits
with the score and flag) and the pipeline (policy flag): ``in_process`` in front of the guarded model itself (one
forward pass: ``shared_forward``) and in front of a separate production model of the same architecture (two
forward passes, the guard on its own thread), and ``bls``.

The server is the nvidia-pytriton wheel's tritonserver (Python backend; every model runs its ONNX graph with ONNX
Runtime, one intra-op thread). Model (``--arch``): the digits zoo's BadNets small CNN (3x32x32 digits), or
a CIFAR-style ResNet-18 at 3x32x32. Measured in one run, interleaved:
- batch 1, one client: ``--requests`` requests per model and round, rounds alternating the models; p50 / p99;
- 8 concurrent clients (a thread and a connection each), batch 1: requests/s over ``--seconds`` per model.

Run: ``PYTHONPATH=src python benchmarks/triton_serving.py [--requests 400 --rounds 3 --seconds 3]``; prints a
table and appends JSON lines to ``--out`` (default benchmarks/triton_serving_results.jsonl).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def build_repository(folder: Path, arch: str) -> tuple[dict[str, str], np.ndarray]:
    """The model, its feature guard and the repository; returns the served names by role and request images.

    ``small_cnn``: the digits zoo's BadNets model, its guard fitted on the poisoned training set and calibrated
    at 1 % FPR on clean test images. ``resnet18_cifar``: an untrained CIFAR-style ResNet-18 at 3x32x32 with a
    guard fitted on random images — latency does not depend on the weights, and no zoo model of that size is
    trained on 2 cores for a benchmark."""
    import torch

    from trojanguard.detect import FeatureMahalanobis
    from trojanguard.guard import Guard, export_onnx, write_triton_repository
    from trojanguard.guard.onnx_export import export_model_onnx
    from trojanguard.models import build_model
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    if arch == "small_cnn":
        entry = get_backdoored_model(ZooConfig(attack="badnets"), show_progress=False)
        model, reference, labels, clean = entry.model, entry.train.dataset.x, None, entry.test.x
    else:
        torch.manual_seed(0)
        model = build_model(arch, num_classes=10, in_channels=3).eval()
        reference = torch.rand(400, 3, 32, 32)
        labels, clean = torch.arange(400) % 10, torch.rand(200, 3, 32, 32)
    torch.manual_seed(1)
    other = build_model(arch, num_classes=10, in_channels=3).eval()  # a separate production model, same cost
    detector = FeatureMahalanobis(model, show_progress=False).fit(reference, labels=labels)
    guard = Guard(model, detector)
    guard.calibrate(clean[:180], fpr=0.01)
    graph = export_onnx(guard, folder / "guard.onnx", clean[:2])
    itself = export_model_onnx(model, folder / "production.onnx", clean[:2])
    separate = export_model_onnx(other, folder / "other.onnx", clean[:2])
    for name, production, pipeline in (("guard", itself, "in_process"), ("guardsep", separate, "in_process"),
                                       ("guardbls", itself, "bls")):
        write_triton_repository(graph, folder / "repo", model_name=name, backend="python", production_model=production,
                                pipeline=pipeline, intra_op_threads=1)
    roles = {"production alone": "guard_production", "guard graph alone": "guard",
             "pipeline in_process, the guarded model (shared forward)": "guard_pipeline",
             "pipeline in_process, a separate production model": "guardsep_pipeline",
             "pipeline bls, the guarded model": "guardbls_pipeline"}
    return roles, clean[180:244].numpy()


def request_for(http, x: np.ndarray):
    request = http.InferInput("input", list(x.shape), "FP32")
    request.set_data_from_numpy(x)
    return request


def latencies(http, url: str, model: str, images: np.ndarray, count: int) -> list[float]:
    client = http.InferenceServerClient(url)
    out = []
    for i in range(count):
        request = request_for(http, images[i % len(images)][None])
        start = time.perf_counter()
        client.infer(model, [request])
        out.append(time.perf_counter() - start)
    client.close()
    return out


def throughput(http, url: str, model: str, images: np.ndarray, clients: int, seconds: float) -> float:
    """Requests per second with ``clients`` threads sending batch-1 requests back to back."""
    stop = time.perf_counter() + seconds
    counts = [0] * clients

    def worker(index: int) -> None:
        client = http.InferenceServerClient(url)
        i = index
        while time.perf_counter() < stop:
            client.infer(model, [request_for(http, images[i % len(images)][None])])
            counts[index] += 1
            i += clients
        client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--arch", choices=("small_cnn", "resnet18_cifar"), default="small_cnn")
    parser.add_argument("--out", default=str(Path(__file__).with_name("triton_serving_results.jsonl")))
    args = parser.parse_args()

    import onnxruntime
    import tritonclient
    from tritonclient import http

    from trojanguard.guard.triton_runtime import LocalTritonServer, find_server_home

    with tempfile.TemporaryDirectory() as tmp:
        models, images = build_repository(Path(tmp), args.arch)
        with LocalTritonServer(Path(tmp) / "repo") as server:
            for model in models.values():  # warm-up: first requests load sessions' caches
                latencies(http, server.url, model, images, 50)
            samples: dict[str, list[float]] = {role: [] for role in models}
            for _ in range(args.rounds):
                for role, model in models.items():
                    samples[role] += latencies(http, server.url, model, images, args.requests)
            rates = {role: throughput(http, server.url, model, images, args.clients, args.seconds)
                     for role, model in models.items()}
    base = float(np.median(samples["production alone"]))
    rows = []
    for role in models:
        p50, p99 = (float(np.percentile(samples[role], q)) for q in (50, 99))
        rows.append({"role": role, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "p50_vs_production": p50 / base,
                     "requests_per_s_8_clients": rates[role]})
    context = {"arch": args.arch, "input_shape": list(images.shape[1:]), "machine": platform.processor() or platform.machine(), "server": str(find_server_home()),
               "onnxruntime": onnxruntime.__version__, "tritonclient": getattr(tritonclient, "__version__", "?"),
               "requests": args.requests * args.rounds, "clients": args.clients, "seconds": args.seconds,
               "date": time.strftime("%Y-%m-%d")}
    print(f"{'model':<58} {'p50 ms':>8} {'p99 ms':>8} {'p50 ratio':>10} {'req/s (' + str(args.clients) + ' clients)':>20}")
    with open(args.out, "a", encoding="utf-8") as out:
        for row in rows:
            print(f"{row['role']:<58} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} {row['p50_vs_production']:>10.3f} "
                  f"{row['requests_per_s_8_clients']:>20.0f}")
            out.write(json.dumps({**row, **context}) + "\n")


if __name__ == "__main__":
    main()
