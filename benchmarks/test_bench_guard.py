"""Serving cost of the guard: ONNX Runtime (CPU) latency of the bare model vs the guard graph (same model +
feature-space detector + in-graph input checks), at batch 1 and 64, one run.

Run: ``python -m pytest benchmarks/test_bench_guard.py --benchmark-only``. The table's "speed-up vs
yardstick" is ``baseline median / entry median``: the guard's overhead ratio is its inverse (issue 4's bar:
overhead ≤ 10 %, i.e. speed-up ≥ 0.91×). Latency does not depend on the weights, so an untrained small CNN
is timed; ONNX Runtime runs one intra-op thread so that the numbers are stable on shared machines.
"""

import warnings

import numpy as np
import pytest
import torch

from trojanguard.detect import FeatureMahalanobis
from trojanguard.guard import Guard, GuardSession, export_onnx
from trojanguard.models import build_model

BATCHES = (1, 64)
THREADS = 1


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    reference = torch.rand(256, 3, 32, 32)
    detector = FeatureMahalanobis(model, show_progress=False).fit(reference, labels=torch.arange(256) % 10)
    guard = Guard(model, detector)
    guard.calibrate(torch.rand(128, 3, 32, 32), fpr=0.05)
    root = tmp_path_factory.mktemp("bench-guard")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (reference[:2],), str(root / "bare.onnx"), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17)
    export_onnx(guard, root / "guard.onnx", reference[:2])
    return root / "bare.onnx", root / "guard.onnx"


def _options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    return options


@pytest.mark.parametrize("entry", ["baseline", "guard", "guard-session"])
@pytest.mark.parametrize("batch", BATCHES)
def test_guard_latency_onnx_runtime_cpu(benchmark, graphs, batch, entry):
    import onnxruntime as ort

    bare, guarded = graphs
    x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
    benchmark.group = f"guard overhead, ONNX Runtime CPU ({THREADS} thread), batch {batch}"
    if entry == "guard-session":  # the guard graph through GuardSession (shape/dtype checks in Python)
        session = GuardSession(guarded, providers="cpu", session_options=_options())

        def run():
            return session.run(x)
    else:
        session = ort.InferenceSession(str(bare if entry == "baseline" else guarded), _options(),
                                       providers=["CPUExecutionProvider"])

        def run():
            return session.run(None, {"input": x})

    for _ in range(20):  # warm-up: first runs allocate and pick kernels
        run()
    benchmark(run)
    benchmark.extra_info["images/s"] = round(batch / benchmark.stats.stats.median, 1)
