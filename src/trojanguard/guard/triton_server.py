"""Serve an exported guard with NVIDIA Triton Inference Server: write a model repository for it.

Layout written by :func:`write_triton_repository` (Triton's ONNX Runtime backend)::

    REPOSITORY/
      trojanguard_guard/          the model name (``model_name``)
        config.pbtxt              inputs/outputs, max_batch_size, dynamic_batching
        trojanguard.json          the guard's metadata (threshold, policy, input range, normalisation)
        1/model.onnx              the guard graph (version 1)

Run it with ``tritonserver --model-repository REPOSITORY`` (docs/guard.md). The configuration is derived from
the ONNX graph itself: Triton owns the leading batch axis (``max_batch_size > 0``), so each tensor's ``dims``
are its shape without the batch axis; the per-sample ``score`` and ``flagged`` outputs have no other axis and
are declared ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }``, Triton's way of saying "batch axis only".
The written file is parsed back against Triton's own ``ModelConfig`` schema and checked against the graph
(:func:`check_triton_repository`) before the function returns.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from trojanguard.errors import DataError, check_positive_int

DEFAULT_MODEL_NAME = "trojanguard_guard"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_QUEUE_DELAY_US = 100  # how long Triton may hold a request to form a larger batch
INSTANCE_KINDS = {"auto": None, "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
BACKEND = "onnxruntime"
MODEL_FILE = "model.onnx"
# ONNX TensorProto element types -> Triton data types
TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
                7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
                13: "TYPE_UINT64", 16: "TYPE_BF16"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as Triton sees it: ``dims`` without the batch axis (−1 = variable)."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    @property
    def batch_only(self) -> bool:
        """The tensor has no axis but the batch axis (declared ``dims: [1]`` + ``reshape: { shape: [] }``)."""
        return len(self.dims) == 0


def graph_tensors(onnx_model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph (``onnx.ModelProto`` or path) as Triton tensors; every one must have
    a symbolic (dynamic) leading batch axis, or Triton cannot batch the model."""
    import onnx

    model = onnx.load(str(onnx_model), load_external_data=False) if isinstance(onnx_model, (str, Path)) else onnx_model
    initializers = {i.name for i in model.graph.initializer}

    def spec(value, kind: str) -> TensorSpec:
        tensor = value.type.tensor_type
        if tensor.elem_type not in TRITON_TYPES:
            raise DataError(f"{kind} {value.name!r}: ONNX element type {tensor.elem_type} has no Triton data type")
        dims = list(tensor.shape.dim)
        if not dims or dims[0].HasField("dim_value"):
            shown = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            raise DataError(f"{kind} {value.name!r} has shape {shown}: Triton's dynamic batching needs a symbolic "
                            "leading batch axis; export with dynamic_batch=True")
        rest = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:])
        return TensorSpec(value.name, TRITON_TYPES[tensor.elem_type], rest)

    inputs = [spec(v, "input") for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v, "output") for v in model.graph.output]
    return inputs, outputs


def _tensor_block(spec: TensorSpec) -> str:
    dims = "[ 1 ]" if spec.batch_only else "[ " + ", ".join(str(d) for d in spec.dims) + " ]"
    reshape = "\n    reshape: { shape: [ ] }" if spec.batch_only else ""
    return f'  {{\n    name: "{spec.name}"\n    data_type: {spec.data_type}\n    dims: {dims}{reshape}\n  }}'


def triton_config(onnx_model, *, model_name: str = DEFAULT_MODEL_NAME, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                  max_queue_delay_microseconds: int = DEFAULT_QUEUE_DELAY_US,
                  preferred_batch_sizes: list[int] | None = None, instance_kind: str = "auto",
                  instance_count: int = 1) -> str:
    """The ``config.pbtxt`` text for an ONNX guard graph (see the module docstring)."""
    check_triton_options(model_name, max_batch_size, max_queue_delay_microseconds, preferred_batch_sizes,
                         instance_kind, instance_count)
    inputs, outputs = graph_tensors(onnx_model)
    lines = [
        "# Written by trojanguard (trojanguard.guard.write_triton_repository) from the guard's ONNX graph.",
        "# Outputs: logits (the model's), score (higher = more suspicious), flagged (score > threshold, or an",
        "# invalid input). Threshold and policy are baked into the graph; see trojanguard.json beside this file.",
        f'name: "{model_name}"',
        f'backend: "{BACKEND}"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_tensor_block(s) for s in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(s) for s in outputs) + "\n]",
    ]
    batching = []
    if preferred_batch_sizes:
        batching.append(f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred_batch_sizes)} ]")
    batching.append(f"  max_queue_delay_microseconds: {max_queue_delay_microseconds}")
    lines.append("dynamic_batching {\n" + "\n".join(batching) + "\n}")
    kind = INSTANCE_KINDS[instance_kind]
    if kind is not None:
        lines.append(f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {kind}\n  }}\n]")
    return "\n".join(lines) + "\n"


def write_triton_repository(onnx_path: str | Path, repository: str | Path, *, model_name: str = DEFAULT_MODEL_NAME,
                            version: int = 1, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                            max_queue_delay_microseconds: int = DEFAULT_QUEUE_DELAY_US,
                            preferred_batch_sizes: list[int] | None = None, instance_kind: str = "auto",
                            instance_count: int = 1) -> Path:
    """Write a Triton model repository serving the guard graph at ``onnx_path``; return the model's folder.

    Args:
        onnx_path: a graph written by :func:`~trojanguard.guard.export_onnx` with ``dynamic_batch=True``
            (anything else, an ordinary classifier included, raises a DataError before anything is written).
        repository: the repository folder (created if needed; other models in it are left alone).
        model_name: the model's folder and ``name`` in its configuration.
        version: the version folder the graph is copied to (``<version>/model.onnx``).
        max_batch_size: the largest batch Triton forms (≥ 1).
        max_queue_delay_microseconds: how long a request may wait for others to batch with.
        preferred_batch_sizes: batch sizes the dynamic batcher aims for (default: none, Triton's advice).
        instance_kind: ``"auto"`` (Triton's default placement: one instance per GPU, or CPU), ``"cpu"``, ``"gpu"``.
        instance_count: instances per device when ``instance_kind`` is set.
    """
    from trojanguard.guard.onnx_export import load_guard_graph, read_metadata

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"onnx_path: no ONNX file at {onnx_path}")
    check_positive_int("version", version)
    graph = load_guard_graph(onnx_path, "onnx_path")  # an ordinary classifier or a broken file stops here
    text = triton_config(graph, model_name=model_name, max_batch_size=max_batch_size,
                         max_queue_delay_microseconds=max_queue_delay_microseconds,
                         preferred_batch_sizes=preferred_batch_sizes, instance_kind=instance_kind,
                         instance_count=instance_count)
    model_dir = Path(repository) / model_name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    target = model_dir / str(version) / MODEL_FILE
    if onnx_path.resolve() != target.resolve():
        shutil.copyfile(onnx_path, target)
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    metadata = read_metadata(graph)
    (model_dir / "trojanguard.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    check_triton_repository(repository, model_name, version=version)
    return model_dir


def parse_triton_config(text_or_path):
    """A ``config.pbtxt`` (text or path) parsed against Triton's ``inference.ModelConfig`` schema; an unknown
    field, a wrong enum value or a syntax error raises ``google.protobuf.text_format.ParseError``."""
    from google.protobuf import text_format

    from trojanguard.guard._triton_server_config import model_config_class

    text = Path(text_or_path).read_text(encoding="utf-8") if isinstance(text_or_path, Path) else str(text_or_path)
    return text_format.Parse(text, model_config_class()())


def check_triton_repository(repository: str | Path, model_name: str = DEFAULT_MODEL_NAME, *, version: int = 1):
    """Parse ``<repository>/<model_name>/config.pbtxt`` and check it against ``<version>/model.onnx``: names, data
    types and dims of every input and output, a positive ``max_batch_size``, dynamic batching. Returns the
    parsed configuration; raises :class:`~trojanguard.errors.DataError` naming the first mismatch."""
    model_dir = Path(repository) / model_name
    config_path, graph_path = model_dir / "config.pbtxt", model_dir / str(version) / MODEL_FILE
    for path in (config_path, graph_path):
        if not path.is_file():
            raise DataError(f"Triton repository: missing {path}")
    config = parse_triton_config(config_path)
    where = str(config_path)
    if config.name and config.name != model_name:
        raise DataError(f"{where}: name {config.name!r} differs from its folder {model_name!r} (Triton refuses it)")
    if config.max_batch_size < 1:
        raise DataError(f"{where}: max_batch_size {config.max_batch_size}; expected >= 1 for batching")
    if not config.HasField("dynamic_batching"):
        raise DataError(f"{where}: no dynamic_batching block")
    if config.backend != BACKEND and config.platform != "onnxruntime_onnx":
        raise DataError(f"{where}: backend {config.backend!r} / platform {config.platform!r}; expected {BACKEND!r}")
    inputs, outputs = graph_tensors(graph_path)
    for kind, declared, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
        if [t.name for t in declared] != [t.name for t in actual]:
            raise DataError(f"{where}: {kind} names {[t.name for t in declared]}, the graph has "
                            f"{[t.name for t in actual]}")
        for tensor, spec in zip(declared, actual):
            data_type = type(config).DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_number[
                tensor.data_type].name
            if data_type != spec.data_type:
                raise DataError(f"{where}: {kind} {spec.name!r} is {data_type}, the graph's is {spec.data_type}")
            dims = tuple(tensor.dims)
            expected = (1,) if spec.batch_only else spec.dims
            if dims != expected:
                raise DataError(f"{where}: {kind} {spec.name!r} has dims {list(dims)}, the graph's (without the batch "
                                f"axis) are {list(expected)}")
            has_reshape = tensor.HasField("reshape")
            if spec.batch_only and not (has_reshape and len(tensor.reshape.shape) == 0):
                raise DataError(f"{where}: {kind} {spec.name!r} has only the batch axis; it needs "
                                "reshape: { shape: [ ] }")
    return config


def check_triton_options(model_name, max_batch_size, delay=DEFAULT_QUEUE_DELAY_US, preferred=None,
                         instance_kind="auto", instance_count=1) -> None:
    """A ValueError naming the first repository option Triton would refuse (callers check before any work)."""
    if not NAME_PATTERN.match(model_name):
        raise ValueError(f"model_name: expected letters, digits, '_', '.' or '-', got {model_name!r}")
    check_positive_int("max_batch_size", max_batch_size)
    if delay < 0:
        raise ValueError(f"max_queue_delay_microseconds: expected a number >= 0, got {delay}")
    if preferred and any(not 1 <= b <= max_batch_size for b in preferred):
        raise ValueError(f"preferred_batch_sizes: expected sizes in [1, max_batch_size={max_batch_size}], got "
                         f"{preferred}")
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance_kind: expected one of {sorted(INSTANCE_KINDS)}, got {instance_kind!r}")
    check_positive_int("instance_count", instance_count)
