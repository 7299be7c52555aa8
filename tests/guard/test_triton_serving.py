"""The guard on a real Triton Inference Server: the tritonserver binary of the nvidia-pytriton wheel (Python backend
only, so the repository is written with backend="python"), started on a loopback port by the tests, requests sent
with tritonclient over HTTP.

Asserted: the guard model's outputs equal GuardSession's on clean and triggered zoo images (logits within 1e-4
relative, flags identical); the pipeline serves the production model's logits with the guard's score and flag;
``reject`` never sends a flagged input to the production model (Triton's own statistics count its inferences);
the dynamic batcher merges concurrent requests; malformed requests (shape, dtype, NaN, 0-255 pixels) fail alone
and the server keeps serving; the server is stopped and its port freed when the code using it raises, and a
server that cannot start says why. Skipped, with the reason, where the binary or tritonclient is missing.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
from helpers import held_out_clean_and_triggered

from trojanguard.detect import FeatureMahalanobis
from trojanguard.guard import Guard, GuardSession, export_onnx, write_triton_repository
from trojanguard.guard.onnx_export import export_model_onnx
from trojanguard.guard.triton_runtime import (
    LocalTritonServer,
    TritonServerError,
    port_is_free,
    probe_failure,
    unavailable_reason,
)
from trojanguard.models import build_model

http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed (pip install -e '.[dev]')")
from tritonclient.utils import InferenceServerException

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no local Triton server: {REASON}")

CALIBRATION = 180
PARITY_RTOL = 1e-4  # the bar: served logits vs GuardSession's, relative
OUTPUTS = ("logits", "score", "flagged")
MAX_BATCH = 64
# flag: the pipeline runs both graphs itself (the default); reject: it calls the served models, so Triton's own
# statistics show which inputs reached the production model (the decision code is the same in both modes)
PIPELINES = {"flag": "in_process", "reject": "bls"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The BadNets zoo model behind a feature guard (flag and reject policies) in front of another network as the
    production model (pipelines as PIPELINES; ``inproc_reject``: reject, in_process), and in front of itself
    (``shared``: flag, in_process, one forward pass), in one repository on one running server; plus the exported
    graphs for reference sessions."""
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    failure = probe_failure()  # a binary that cannot start here (libraries, Python) is a skip, with the reason
    if failure is not None:
        pytest.skip(failure)
    entry = get_backdoored_model(ZooConfig(attack="badnets"), show_progress=False)
    detector = FeatureMahalanobis(entry.model, show_progress=False).fit(entry.train.dataset.x)
    folder = tmp_path_factory.mktemp("serving")
    other = build_model("small_cnn", num_classes=10, in_channels=entry.test.x.shape[1]).eval()  # seeded by _seed
    production = export_model_onnx(other, folder / "production.onnx", entry.test.x[:2])
    graphs = {}
    for policy in ("flag", "reject"):
        guard = Guard(entry.model, detector, policy=policy)
        guard.calibrate(entry.test.x[:CALIBRATION], fpr=0.05)
        graphs[policy] = export_onnx(guard, folder / f"guard_{policy}.onnx", entry.test.x[:2])
        write_triton_repository(graphs[policy], folder / "repo", model_name=f"guard_{policy}", backend="python",
                                production_model=production, max_batch_size=MAX_BATCH, intra_op_threads=1,
                                max_queue_delay_microseconds=2000, pipeline=PIPELINES[policy])
    write_triton_repository(graphs["reject"], folder / "repo", model_name="inproc_reject", backend="python",
                            production_model=production, max_batch_size=MAX_BATCH, intra_op_threads=1)
    itself = export_model_onnx(entry.model, folder / "itself.onnx", entry.test.x[:2])
    write_triton_repository(graphs["flag"], folder / "repo", model_name="shared", backend="python",
                            production_model=itself, max_batch_size=MAX_BATCH, intra_op_threads=1)
    x, triggered = held_out_clean_and_triggered(entry, start=CALIBRATION)
    with LocalTritonServer(folder / "repo") as server:
        client = http.InferenceServerClient(server.url)
        yield {"server": server, "client": client, "graphs": graphs, "production": production, "repo": folder / "repo",
               "x": x.numpy(), "triggered": triggered.numpy()}
        client.close()


def infer(client, model, x, outputs=OUTPUTS, datatype="FP32"):
    """The named outputs of ``model`` on ``x`` (batches of at most MAX_BATCH), score and flagged as (N,)."""
    parts = []
    for start in range(0, len(x), MAX_BATCH):
        chunk = x[start : start + MAX_BATCH]
        request = http.InferInput("input", list(chunk.shape), datatype)
        request.set_data_from_numpy(chunk)
        result = client.infer(model, [request], outputs=[http.InferRequestedOutput(name) for name in outputs])
        parts.append([result.as_numpy(name) for name in outputs])
    return [np.concatenate([p[i] for p in parts]).reshape(len(x), -1).squeeze(1) if outputs[i] != "logits"
            else np.concatenate([p[i] for p in parts]) for i in range(len(outputs))]


def inference_count(client, model) -> int:
    return int(client.get_inference_statistics(model)["model_stats"][0]["inference_count"])


def assert_serves_the_guard_graph(served, model: str) -> np.ndarray:
    """``model``'s outputs on the held-out images equal GuardSession's on the flag guard graph (logits within 1e-4
    relative, scores close, flags identical); returns the flags."""
    x = served["x"]
    logits, score, flagged = infer(served["client"], model, x)
    expected = GuardSession(served["graphs"]["flag"], providers="cpu").run(x)
    np.testing.assert_allclose(logits, expected.logits, rtol=PARITY_RTOL, atol=1e-6)
    np.testing.assert_allclose(score, expected.score, rtol=PARITY_RTOL, atol=1e-5)
    np.testing.assert_array_equal(flagged, expected.flagged)
    return flagged


def test_guard_model_serves_what_guard_session_computes(served):
    """Clean and triggered zoo images: as GuardSession; most triggered images flagged, few clean ones (the
    calibrated 5 %)."""
    flagged = assert_serves_the_guard_graph(served, "guard_flag")
    triggered = served["triggered"]
    assert flagged[triggered].mean() > 0.8 and flagged[~triggered].mean() < 0.15


def test_pipeline_flag_serves_the_production_model_with_the_guards_score(served):
    x = served["x"]
    logits, score, flagged = infer(served["client"], "guard_flag_pipeline", x)
    production = ort.InferenceSession(str(served["production"]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(logits, production.run(None, {"input": x})[0], rtol=PARITY_RTOL, atol=1e-6)
    expected = GuardSession(served["graphs"]["flag"], providers="cpu").run(x)
    np.testing.assert_array_equal(flagged, expected.flagged)
    np.testing.assert_allclose(score, expected.score, rtol=PARITY_RTOL, atol=1e-5)


def test_a_pipeline_in_front_of_the_guarded_model_itself_runs_one_forward_pass(served):
    """Production model = the guarded model: the in_process pipeline serves the guard graph's own outputs (checked
    equal when written), with no production graph of its own."""
    from trojanguard.guard import check_triton_repository

    config = check_triton_repository(served["repo"], "shared_pipeline")
    assert config.parameters["shared_forward"].string_value == "true"
    assert not (served["repo"] / "shared_pipeline" / "1" / "production.onnx").exists()
    for other in ("guard_flag_pipeline", "inproc_reject_pipeline"):  # another network: two graphs
        assert check_triton_repository(served["repo"], other).parameters["shared_forward"].string_value == "false"
    assert_serves_the_guard_graph(served, "shared_pipeline")


def test_pipeline_reject_never_calls_the_production_model_for_a_flagged_input(served):
    client, x = served["client"], served["x"]
    before = inference_count(client, "guard_reject_production")
    logits, _, flagged = infer(client, "guard_reject_pipeline", x)
    answered = inference_count(client, "guard_reject_production") - before
    assert flagged.any() and not flagged.all()
    assert answered == int((~flagged).sum())  # Triton's count of the production model's inferences
    assert np.isnan(logits[flagged]).all() and np.isfinite(logits[~flagged]).all()
    production = ort.InferenceSession(str(served["production"]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(logits[~flagged], production.run(None, {"input": x[~flagged]})[0], rtol=PARITY_RTOL,
                               atol=1e-6)
    # a request whose every input is flagged: no call at all
    before = inference_count(client, "guard_reject_production")
    _, _, all_flagged = infer(client, "guard_reject_pipeline", x[served["triggered"] & flagged][:4])
    assert all_flagged.all() and inference_count(client, "guard_reject_production") == before


def test_in_process_reject_pipeline_withholds_what_the_guard_flags(served):
    """The default pipeline (in_process) under reject: flagged rows NaN, the others the production model's logits,
    the same answer as the bls pipeline (whose calls Triton counts, above); a batch all flagged is answered."""
    client, x = served["client"], served["x"]
    logits, _, flagged = infer(client, "inproc_reject_pipeline", x)
    expected = GuardSession(served["graphs"]["reject"], providers="cpu").run(x)
    np.testing.assert_array_equal(flagged, expected.flagged)
    assert flagged.any() and not flagged.all()
    assert np.isnan(logits[flagged]).all() and np.isfinite(logits[~flagged]).all()
    production = ort.InferenceSession(str(served["production"]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(logits[~flagged], production.run(None, {"input": x[~flagged]})[0], rtol=PARITY_RTOL,
                               atol=1e-6)
    bls_logits, _, _ = infer(client, "guard_reject_pipeline", x)
    np.testing.assert_array_equal(np.isnan(bls_logits), np.isnan(logits))
    all_flagged, _, every = infer(client, "inproc_reject_pipeline", x[served["triggered"] & flagged][:4])
    assert every.all() and all_flagged.shape == (4, logits.shape[1]) and np.isnan(all_flagged).all()


def test_dynamic_batching_merges_concurrent_requests(served):
    """64 single-image requests from 16 client threads (a client each): Triton runs them in fewer executions."""
    x, url = served["x"][:32], served["server"].url
    stats = served["client"].get_inference_statistics("guard_flag")["model_stats"][0]
    before = (int(stats["inference_count"]), int(stats["execution_count"]))
    local = threading.local()

    def one(i):
        if not hasattr(local, "client"):
            local.client = http.InferenceServerClient(url)
        request = http.InferInput("input", [1, *x.shape[1:]], "FP32")
        request.set_data_from_numpy(x[i % len(x) : i % len(x) + 1])
        return local.client.infer("guard_flag", [request]).as_numpy("flagged").reshape(-1)[0]

    with ThreadPoolExecutor(16) as pool:
        flags = list(pool.map(one, range(64)))
    expected = GuardSession(served["graphs"]["flag"], providers="cpu").run(x).flagged
    np.testing.assert_array_equal(flags, np.tile(expected, 2))
    stats = served["client"].get_inference_statistics("guard_flag")["model_stats"][0]
    inferences, executions = int(stats["inference_count"]) - before[0], int(stats["execution_count"]) - before[1]
    assert inferences == 64 and executions < inferences  # several requests ran as one model execution


@pytest.mark.parametrize("model", ["guard_flag", "guard_flag_pipeline"])
def test_malformed_requests_fail_alone_and_the_server_keeps_serving(served, model):
    client, x = served["client"], served["x"][:4]
    nan = x.copy()
    nan[1, 0, 3, 3] = np.nan
    cases = [(x[:, :, :-1], "FP32", "shape"), (x.astype(np.float64), "FP64", "FP64"), (nan, "FP32", "finite"),
             (x * 255, "FP32", "0-255")]
    for data, datatype, needle in cases:
        request = http.InferInput("input", list(data.shape), datatype)
        request.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException, match=needle):
            client.infer(model, [request])
    assert served["server"].ready()
    _, _, flagged = infer(client, model, x)
    np.testing.assert_array_equal(flagged, GuardSession(served["graphs"]["flag"], providers="cpu").run(x).flagged)


def test_server_is_stopped_and_its_port_freed_when_the_caller_fails(served, tmp_path):
    graph = served["graphs"]["flag"]
    write_triton_repository(graph, tmp_path / "repo", model_name="g", backend="python", intra_op_threads=1)
    server = LocalTritonServer(tmp_path / "repo")
    with pytest.raises(RuntimeError, match="the caller failed"), server:
        assert server.ready()
        raise RuntimeError("the caller failed")
    assert server.process is None and port_is_free(server.http_port) and not server.ready()


def test_a_server_that_cannot_start_says_why_and_frees_its_port(served, tmp_path):
    graph = served["graphs"]["flag"]
    model_dir = write_triton_repository(graph, tmp_path / "repo", model_name="g", backend="python")
    (model_dir / "1" / "model.onnx").write_bytes(b"not onnx")  # the model fails to load: the server exits
    server = LocalTritonServer(tmp_path / "repo", startup_timeout=60)
    with pytest.raises(TritonServerError, match="model.onnx|onnxruntime|INVALID|failed to load"):
        server.start()
    assert server.process is None and port_is_free(server.http_port)
