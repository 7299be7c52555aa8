"""The Triton model repository of a guard: config.pbtxt parsed with Triton's own ModelConfig schema and checked
against the ONNX graph (names, dims, data types of every input and output; max_batch_size; dynamic batching);
the graph runs in ONNX Runtime at the shapes the config promises; broken configs and graphs are refused."""

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format

from trojanguard.detect import FeatureMahalanobis
from trojanguard.errors import DataError
from trojanguard.guard import (
    Guard,
    check_triton_repository,
    export_onnx,
    parse_triton_config,
    triton_config,
    write_triton_repository,
)
from trojanguard.models import build_model

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.BOOL: "TYPE_BOOL"}
TRITON_TO_NUMPY = {"TYPE_FP32": np.float32, "TYPE_BOOL": np.bool_}


@pytest.fixture(scope="module")
def guard_graph(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=5, in_channels=1).eval()
    x = torch.rand(60, 1, 20, 20, generator=torch.Generator().manual_seed(1))
    detector = FeatureMahalanobis(model, show_progress=False).fit(x, labels=torch.arange(60) % 5)
    guard = Guard(model, detector)
    guard.calibrate(x[:30], fpr=0.1)
    return export_onnx(guard, tmp_path_factory.mktemp("triton") / "guard.onnx", x[:2]), x


def test_config_matches_the_onnx_graph(guard_graph, tmp_path):
    graph_path, _ = guard_graph
    model_dir = write_triton_repository(graph_path, tmp_path, model_name="tg", max_batch_size=32,
                                        preferred_batch_sizes=[8, 32], max_queue_delay_microseconds=250)
    assert (model_dir / "1" / "model.onnx").read_bytes() == graph_path.read_bytes()
    config = parse_triton_config(model_dir / "config.pbtxt")  # Triton's schema: unknown fields would not parse
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    data_type = type(config).DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_number
    assert config.name == "tg" and config.backend == "onnxruntime"
    assert config.max_batch_size == 32
    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [v.name for v in actual]
        for tensor, value in zip(declared, actual):
            shape = value.type.tensor_type.shape.dim
            assert shape[0].dim_param, f"{value.name}: the graph's batch axis must be symbolic"
            assert data_type[tensor.data_type].name == ONNX_TO_TRITON[value.type.tensor_type.elem_type]
            rest = [d.dim_value for d in shape[1:]]
            if rest:
                assert list(tensor.dims) == rest and not tensor.HasField("reshape")
            else:  # batch axis only: [1] on the wire, reshaped to [] for the model
                assert list(tensor.dims) == [1] and list(tensor.reshape.shape) == []
    assert [t.name for t in config.output] == ["logits", "score", "flagged"]
    assert list(config.input[0].dims) == [1, 20, 20] and list(config.output[0].dims) == [5]


def test_graph_runs_at_the_batch_sizes_the_config_allows(guard_graph, tmp_path):
    """What Triton's ONNX Runtime backend does with a dynamic batch: run 1 … max_batch_size samples; each output
    is ``[batch] + dims`` (``[batch]`` where reshape drops the 1)."""
    graph_path, x = guard_graph
    model_dir = write_triton_repository(graph_path, tmp_path, max_batch_size=16)
    config = parse_triton_config(model_dir / "config.pbtxt")
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    data_type = type(config).DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_number
    for batch in (1, 7, config.max_batch_size):
        outputs = session.run(None, {"input": x[:batch].numpy()})
        for tensor, value in zip(config.output, outputs):
            expected = [batch] + (list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims))
            assert list(value.shape) == expected
            assert value.dtype == TRITON_TO_NUMPY[data_type[tensor.data_type].name]


def test_broken_configs_and_graphs_are_refused(guard_graph, tmp_path):
    graph_path, x = guard_graph
    model_dir = write_triton_repository(graph_path, tmp_path)
    config_path = model_dir / "config.pbtxt"
    good = config_path.read_text()
    config_path.write_text(good.replace("dims: [ 5 ]", "dims: [ 6 ]"))
    with pytest.raises(DataError, match=r"'logits' has dims \[6\]"):
        check_triton_repository(tmp_path)
    config_path.write_text(good.replace("TYPE_BOOL", "TYPE_FP32"))
    with pytest.raises(DataError, match="'flagged' is TYPE_FP32"):
        check_triton_repository(tmp_path)
    config_path.write_text(good.replace("dynamic_batching {\n  max_queue_delay_microseconds: 100\n}\n", ""))
    with pytest.raises(DataError, match="dynamic_batching"):
        check_triton_repository(tmp_path)
    config_path.write_text(good.replace("max_batch_size", "max_batch"))
    with pytest.raises(text_format.ParseError):
        check_triton_repository(tmp_path)
    # a graph exported with a fixed batch cannot be batched by Triton
    fixed = tmp_path / "fixed.onnx"
    model = build_model("small_cnn", num_classes=5, in_channels=1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:2],), str(fixed), dynamo=False, input_names=["input"], output_names=["logits"])
    with pytest.raises(DataError, match="symbolic leading batch axis"):
        triton_config(fixed)
    with pytest.raises(ValueError, match="max_batch_size"):
        write_triton_repository(graph_path, tmp_path, max_batch_size=0)
    with pytest.raises(ValueError, match="model_name"):
        write_triton_repository(graph_path, tmp_path, model_name="bad name")


def test_python_backend_repository_with_a_pipeline(guard_graph, tmp_path):
    """backend="python": each model is config + model.py + its graph; the pipeline (in_process) holds both graphs
    and names the models, policy and input check it needs; every config parses with Triton's schema."""
    from trojanguard.guard.onnx_export import export_model_onnx

    graph_path, x = guard_graph
    production = export_model_onnx(build_model("small_cnn", num_classes=3, in_channels=1).eval(),
                                   tmp_path / "production.onnx", x[:2])
    write_triton_repository(graph_path, tmp_path / "repo", model_name="g", backend="python",
                            production_model=production, python_path=["/nowhere", str(tmp_path)])
    for name in ("g", "g_production", "g_pipeline"):
        config = check_triton_repository(tmp_path / "repo", name)
        assert config.backend == "python" and config.parameters["python_path"].string_value.startswith("/nowhere")
    pipeline = check_triton_repository(tmp_path / "repo", "g_pipeline")
    parameters = {key: value.string_value for key, value in pipeline.parameters.items()}
    assert parameters["guard_model"] == "g" and parameters["production_model"] == "g_production"
    assert parameters["policy"] == "flag" and parameters["pipeline_mode"] == "in_process"
    assert float(parameters["pixel_cutoff"]) == 2.0  # the guard's [0, 1] input range, as GuardSession refuses
    assert [tuple(o.dims) for o in pipeline.output] == [(3,), (1,), (1,)]  # the production model's logits
    folder = tmp_path / "repo" / "g_pipeline" / "1"
    assert (folder / "guard.onnx").read_bytes() == graph_path.read_bytes()
    assert (folder / "production.onnx").read_bytes() == production.read_bytes()
    (folder / "production.onnx").unlink()
    with pytest.raises(DataError, match="missing .*production.onnx"):
        check_triton_repository(tmp_path / "repo", "g_pipeline")


def test_production_models_the_pipeline_cannot_feed_are_refused(guard_graph, tmp_path):
    from trojanguard.guard.onnx_export import export_model_onnx

    graph_path, _ = guard_graph
    model = build_model("small_cnn", num_classes=3, in_channels=1).eval()
    other_size = export_model_onnx(model, tmp_path / "other.onnx", torch.rand(2, 1, 16, 16))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(other_size.read_bytes()[:100])
    cases = [(other_size, r"TYPE_FP32 \[1, 20, 20\].*got TYPE_FP32 \[1, 16, 16\]"), (broken, "cannot read"),
             (tmp_path / "missing.onnx", "no such file")]
    for path, message in cases:
        with pytest.raises(DataError, match=f"production_model: .*{message}"):
            write_triton_repository(graph_path, tmp_path / "repo", backend="python", production_model=path)
        assert not (tmp_path / "repo").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="pipeline: expected one of"):
        write_triton_repository(graph_path, tmp_path / "repo", pipeline="ensemble")
    with pytest.raises(ValueError, match="backend: expected one of"):
        write_triton_repository(graph_path, tmp_path / "repo", backend="tensorrt")
