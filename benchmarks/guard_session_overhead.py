"""GuardSession's Python-side cost at batch 1 (issue 21): the feature guard graph through ``GuardSession.run`` vs the
same graph through a bare ONNX Runtime session, timed alternately in one loop (median of the per-call ratios), one
intra-op thread; and ``validate``'s own microseconds per call.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/guard_session_overhead.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from trojanguard.detect import FeatureMahalanobis
from trojanguard.guard import Guard, GuardSession, export_onnx
from trojanguard.models import build_model

CALLS = 3000


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    reference = torch.rand(256, 3, 32, 32)
    detector = FeatureMahalanobis(model, show_progress=False).fit(reference, labels=torch.arange(256) % 10)
    guard = Guard(model, detector)
    guard.calibrate(torch.rand(128, 3, 32, 32), fpr=0.05)
    path = Path(tempfile.mkdtemp()) / "guard.onnx"
    export_onnx(guard, path, reference[:2])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    raw = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session = GuardSession(path, providers="cpu", session_options=options)
    names = [o.name for o in raw.get_outputs()]
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    for _ in range(200):  # warm-up
        raw.run(names, {"input": x})
        session.run(x)
    ratios, raw_times = [], []
    for _ in range(CALLS):
        t0 = time.perf_counter()
        raw.run(names, {"input": x})
        t1 = time.perf_counter()
        session.run(x)
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
        raw_times.append(t1 - t0)
    start = time.perf_counter()
    for _ in range(CALLS):
        session.validate(x)
    validate_us = (time.perf_counter() - start) / CALLS * 1e6
    print(f"GuardSession / bare session of the guard graph, batch 1: median {statistics.median(ratios):.3f} "
          f"[{np.percentile(ratios, 25):.3f}, {np.percentile(ratios, 75):.3f}]; validate {validate_us:.1f} µs; "
          f"bare run {statistics.median(raw_times) * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
