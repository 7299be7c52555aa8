"""Serve an exported guard with NVIDIA Triton Inference Server: write a model repository for it.

Layout written by :func:`write_triton_repository`::

    REPOSITORY/
      trojanguard_guard/          the model name (``model_name``)
        config.pbtxt              inputs/outputs, max_batch_size, dynamic_batching, backend
        trojanguard.json          the guard's metadata (threshold, policy, input range, normalisation)
        1/model.onnx              the guard graph (version 1)
        1/model.py                backend="python" only: runs model.onnx with ONNX Runtime
      trojanguard_guard_production/   with production_model: the production model, same backend
      trojanguard_guard_pipeline/     with production_model: the guard in front of it (Python backend,
                                      business-logic scripting; policy flag or reject, the guard's)

``backend="onnxruntime"`` is for the standard Triton containers (ONNX Runtime backend); ``backend="python"``
serves the same graph from Triton's Python backend (ONNX Runtime inside it), which is what a server without
the ONNX Runtime backend (the ``tritonserver`` in the ``nvidia-pytriton`` wheel) can run. The pipeline is a
Python-backend model in both. Run it with ``tritonserver --model-repository REPOSITORY`` (docs/guard.md) or
:class:`~trojanguard.guard.triton_runtime.LocalTritonServer`. The configuration is derived from
the ONNX graph itself: Triton owns the leading batch axis (``max_batch_size > 0``), so each tensor's ``dims``
are its shape without the batch axis; the per-sample ``score`` and ``flagged`` outputs have no other axis and
are declared ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }``, Triton's way of saying "batch axis only".
The written file is parsed back against Triton's own ``ModelConfig`` schema and checked against the graph
(:func:`check_triton_repository`) before the function returns.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from trojanguard.errors import DataError, check_choice, check_positive_int
from trojanguard.guard import triton_models

DEFAULT_MODEL_NAME = "trojanguard_guard"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_QUEUE_DELAY_US = 100  # how long Triton may hold a request to form a larger batch
INSTANCE_KINDS = {"auto": None, "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
BACKENDS = ("onnxruntime", "python")
MODEL_FILE = "model.onnx"
PYTHON_MODEL_FILE = "model.py"
PRODUCTION_SUFFIX, PIPELINE_SUFFIX = "_production", "_pipeline"  # the added models' names: model_name + suffix
GUARD_OUTPUTS = ("score", "flagged")  # what the pipeline reads from the guard
PIPELINE_MODES = ("in_process", "bls")  # the pipeline runs both graphs itself, or calls the two served models
PIPELINE_GRAPHS = ("guard.onnx", "production.onnx")  # beside an in_process pipeline's model.py
# ONNX TensorProto element types -> Triton data types
TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
                7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
                13: "TYPE_UINT64", 16: "TYPE_BF16"}
GUARD_COMMENT = [
    "# Written by trojanguard (trojanguard.guard.write_triton_repository) from the guard's ONNX graph.",
    "# Outputs: logits (the model's), score (higher = more suspicious), flagged (score > threshold, or an",
    "# invalid input). Threshold and policy are baked into the graph; see trojanguard.json beside this file."]
PRODUCTION_COMMENT = ["# Written by trojanguard (trojanguard.guard.write_triton_repository): the production model the",
                      "# pipeline beside it calls after the guard."]
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
                  instance_count: int = 1, backend: str = "onnxruntime",
                  parameters: dict[str, str] | None = None, comment: list[str] | None = None) -> str:
    """The ``config.pbtxt`` text for an ONNX guard graph (see the module docstring); ``parameters`` become
    the configuration's string parameters (what a Python-backend model reads), ``comment`` its header lines."""
    check_triton_options(model_name, max_batch_size, max_queue_delay_microseconds, preferred_batch_sizes,
                         instance_kind, instance_count, backend)
    inputs, outputs = graph_tensors(onnx_model)
    return _config_text(GUARD_COMMENT if comment is None else comment, model_name, backend, inputs, outputs, max_batch_size, max_queue_delay_microseconds,
                        preferred_batch_sizes, INSTANCE_KINDS[instance_kind], instance_count, parameters)


def _config_text(comment: list[str], model_name: str, backend: str, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], max_batch_size: int, delay: int, preferred: list[int] | None,
                 kind: str | None, count: int, parameters: dict[str, str] | None) -> str:
    lines = [*comment, f'name: "{model_name}"', f'backend: "{backend}"', f"max_batch_size: {max_batch_size}",
             "input [\n" + ",\n".join(_tensor_block(s) for s in inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor_block(s) for s in outputs) + "\n]"]
    batching = [f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]"] if preferred else []
    batching.append(f"  max_queue_delay_microseconds: {delay}")
    lines.append("dynamic_batching {\n" + "\n".join(batching) + "\n}")
    if kind is not None:
        lines.append(f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]")
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{_pbtxt_string(value)}" }}\n}}')
    return "\n".join(lines) + "\n"


def _pbtxt_string(value: str) -> str:
    """``value`` inside a text-format string literal (backslashes and quotes escaped; control characters
    refused: no path or name needs them)."""
    if any(ord(c) < 32 for c in value):
        raise ValueError(f"parameter value: expected printable text, got {value!r}")
    return value.replace("\\", "\\\\").replace('"', '\\"')


def write_triton_repository(onnx_path: str | Path, repository: str | Path, *, model_name: str = DEFAULT_MODEL_NAME,
                            version: int = 1, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                            max_queue_delay_microseconds: int = DEFAULT_QUEUE_DELAY_US,
                            preferred_batch_sizes: list[int] | None = None, instance_kind: str = "auto",
                            instance_count: int = 1, backend: str = "onnxruntime",
                            production_model: str | Path | None = None, pipeline: str = "in_process",
                            python_path: str | list[str] = "auto", intra_op_threads: int = 0) -> Path:
    """Write a Triton model repository serving the guard graph at ``onnx_path``; return the guard model's folder.

    Args:
        onnx_path: a graph written by :func:`~trojanguard.guard.export_onnx` with ``dynamic_batch=True``
            (anything else, an ordinary classifier included, raises a DataError before anything is written).
        repository: the repository folder (created if needed; other models in it are left alone).
        model_name: the guard model's folder and ``name`` in its configuration.
        version: the version folder the graph is copied to (``<version>/model.onnx``).
        max_batch_size: the largest batch Triton forms (≥ 1).
        max_queue_delay_microseconds: how long a request may wait for others to batch with.
        preferred_batch_sizes: batch sizes the dynamic batcher aims for (default: none, Triton's advice).
        instance_kind: ``"auto"`` (Triton's default placement: one instance per GPU, or CPU), ``"cpu"``, ``"gpu"``.
        instance_count: instances per device when ``instance_kind`` is set.
        backend: ``"onnxruntime"`` (Triton's ONNX Runtime backend, standard containers) or ``"python"`` (a
            ``model.py`` running the graph with ONNX Runtime inside Triton's Python backend).
        production_model: an ONNX classifier taking the guard's input (dynamic batch axis, float32); adds the
            models ``<model_name>_production`` (same backend) and ``<model_name>_pipeline`` (the guard in front
            of it, policy from the guard graph: ``flag`` passes every input on, ``reject`` never sends a
            flagged input to the production model).
        pipeline: ``"in_process"`` (the pipeline runs both graphs in its own ONNX Runtime sessions: one server
            hop, the lowest latency) or ``"bls"`` (it calls the two served models: they may run on any backend
            or device, at the cost of two more hops; measured in benchmarks/triton_serving.py).
        python_path: directories the Python-backend models put on ``sys.path`` to find NumPy and ONNX Runtime
            (``"auto"``: this interpreter's site-packages; missing directories are skipped at load time, so a
            container's own packages are used there).
        intra_op_threads: ONNX Runtime threads of each Python-backend model instance (0: its default).
    """
    from trojanguard.guard.onnx_export import load_guard_graph, read_metadata

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"onnx_path: no ONNX file at {onnx_path}")
    check_positive_int("version", version)
    check_triton_options(model_name, max_batch_size, max_queue_delay_microseconds, preferred_batch_sizes,
                         instance_kind, instance_count, backend)
    check_choice("pipeline", pipeline, PIPELINE_MODES)
    if isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int) or intra_op_threads < 0:
        raise ValueError(f"intra_op_threads: expected an integer >= 0, got {intra_op_threads!r}")
    graph = load_guard_graph(onnx_path, "onnx_path")  # an ordinary classifier or a broken file stops here
    guard_inputs = graph_tensors(graph)[0]
    production = None
    if production_model is not None:
        production_model = Path(production_model)
        production = load_production_graph(production_model, guard_inputs[0])
    metadata = read_metadata(graph)
    bounds = metadata.get("input_range")
    cutoff = 2 * float(bounds[1]) if bounds and bounds[0] == 0 and bounds[1] > 0 else None  # as GuardSession's
    python = {"python_path": _python_path(python_path), "intra_op_threads": str(intra_op_threads)}
    batching = {"max_batch_size": max_batch_size, "max_queue_delay_microseconds": max_queue_delay_microseconds,
                    "preferred_batch_sizes": preferred_batch_sizes, "instance_kind": instance_kind,
                    "instance_count": instance_count, "backend": backend}
    repository = Path(repository)
    guard_python = {**python, "pixel_cutoff": "" if cutoff is None else repr(cutoff)}
    model_dir = _write_onnx_model(repository, model_name, version, onnx_path, graph, batching, guard_python)
    (model_dir / "trojanguard.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    if production is not None:
        production_name = model_name + PRODUCTION_SUFFIX
        _write_onnx_model(repository, production_name, version, production_model, production, batching,
                          {**python, "pixel_cutoff": ""})
        check_triton_repository(repository, production_name, version=version)
        _write_pipeline(repository, model_name, version, (onnx_path, graph), (production_model, production), pipeline,
                        str(metadata["policy"]), guard_python, batching)
    check_triton_repository(repository, model_name, version=version)
    return model_dir


def _write_pipeline(repository: Path, model_name: str, version: int, guard: tuple, production: tuple, pipeline: str,
                    policy: str, python: dict[str, str], batching: dict) -> None:
    """``<model_name>_pipeline``: config + model.py, and for ``in_process`` the graphs it runs itself — only the
    guard's when the production model computes the guard's own first output (:func:`same_first_output`): then one
    forward pass serves both."""
    (guard_path, guard_graph), (production_path, production_graph) = guard, production
    guard_inputs, guard_outputs = graph_tensors(guard_graph)
    (production_input,), production_outputs = graph_tensors(production_graph)
    production_name, pipeline_name = model_name + PRODUCTION_SUFFIX, model_name + PIPELINE_SUFFIX
    shared = pipeline == "in_process" and same_first_output(guard_path, production_path)
    served = TensorSpec(guard_outputs[0].name, production_outputs[0].data_type, production_outputs[0].dims)
    parameters = {"guard_model": model_name, "guard_input": guard_inputs[0].name, "production_model": production_name,
                  "production_input": production_input.name, "production_output": production_outputs[0].name,
                  "policy": policy, "pipeline_mode": pipeline, "shared_forward": str(shared).lower(), **python}
    comment = [(f"# Written by trojanguard: the guard {model_name} in front of the production model {production_name} "
               f"(policy {policy})."),
               (f"# Outputs: {served.name} (the production model's; NaN where the policy withheld it), score, flagged "
               "(the guard's).")]
    if shared:
        comment.append("# The production model computes the guard graph's own first output (checked on random inputs "
                       "when written): one forward pass serves both.")
    folder = repository / pipeline_name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    _copy_python_files(folder, triton_models.PIPELINE_MODEL)
    for source, name, needed in zip((guard_path, production_path), PIPELINE_GRAPHS,
                                    (pipeline == "in_process", pipeline == "in_process" and not shared)):
        if needed:
            shutil.copyfile(source, folder / name)
        else:
            (folder / name).unlink(missing_ok=True)
    # in_process runs the graphs itself: it goes where the models would (instance_kind); bls only calls them
    kind = INSTANCE_KINDS[batching["instance_kind"]] if pipeline == "in_process" else "KIND_CPU"
    text = _config_text(comment, pipeline_name, "python", guard_inputs, [served, *guard_outputs[1:]],
                        batching["max_batch_size"], batching["max_queue_delay_microseconds"],
                        batching["preferred_batch_sizes"], kind, batching["instance_count"], parameters)
    (repository / pipeline_name / "config.pbtxt").write_text(text, encoding="utf-8")
    check_triton_repository(repository, pipeline_name, version=version)


def same_first_output(guard_path: Path, production_path: Path, samples: int = 8) -> bool:
    """True when the production graph's first output equals the guard graph's first output (the guarded model's
    logits or features) on ``samples`` random images in [0, 1] (relative 1e-4): the production model *is* the
    guarded model, and a pipeline can serve the guard graph's own output instead of a second forward pass."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    outputs = []
    for path in (guard_path, production_path):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        shape = session.get_inputs()[0].shape[1:]
        x = np.random.default_rng(0).random((samples, *shape), dtype=np.float32)
        outputs.append(session.run([session.get_outputs()[0].name], {session.get_inputs()[0].name: x})[0])
    guard, production = outputs
    return guard.shape == production.shape and bool(np.allclose(guard, production, rtol=1e-4,
                                                                 atol=1e-5 * max(1.0, float(np.abs(guard).max()))))


def _write_onnx_model(repository: Path, name: str, version: int, source: Path, graph, batching: dict,
                      python: dict[str, str]) -> Path:
    """One served ONNX graph: ``<name>/config.pbtxt`` and ``<name>/<version>/model.onnx`` (+ model.py for the
    Python backend)."""
    comment = PRODUCTION_COMMENT if name.endswith(PRODUCTION_SUFFIX) else None
    text = triton_config(graph, model_name=name, parameters=python if batching["backend"] == "python" else None,
                         comment=comment, **batching)
    model_dir = repository / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    target = model_dir / str(version) / MODEL_FILE
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    if batching["backend"] == "python":
        _copy_python_files(model_dir / str(version), triton_models.ONNX_MODEL)
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return model_dir


def _copy_python_files(version_dir: Path, model_file: Path) -> None:
    shutil.copyfile(model_file, version_dir / PYTHON_MODEL_FILE)
    shutil.copyfile(triton_models.COMMON, version_dir / (triton_models.COMMON_NAME + ".py"))


def _python_path(python_path: str | list[str]) -> str:
    """The ``python_path`` parameter: ``"auto"`` → this interpreter's site-packages (pure and platform)."""
    if python_path == "auto":
        import sysconfig

        paths = sysconfig.get_paths()
        entries = list(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    else:
        entries = [python_path] if isinstance(python_path, (str, Path)) else list(python_path)
    return os.pathsep.join(str(e) for e in entries)


def load_production_graph(path: Path, guard_input: TensorSpec, name: str = "production_model"):
    """The ONNX classifier at ``path`` when the pipeline can feed it the guard's input: one input of the guard's
    shape (without the batch axis) and float32, a symbolic batch axis, a float32 first output. Anything else
    (a missing, broken or non-ONNX file, another shape) raises a DataError naming ``name``."""
    from trojanguard.guard.onnx_export import load_onnx_file

    graph = load_onnx_file(path, name)
    try:
        inputs, outputs = graph_tensors(graph)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from None
    if len(inputs) != 1:
        raise DataError(f"{name}: expected one input (images), got {[i.name for i in inputs]}")
    if (inputs[0].data_type, inputs[0].dims) != (guard_input.data_type, guard_input.dims):
        raise DataError(f"{name}: expected an input of {guard_input.data_type} {list(guard_input.dims)} (the "
                        f"guard's, without the batch axis), got {inputs[0].data_type} {list(inputs[0].dims)}")
    if not outputs or outputs[0].data_type != "TYPE_FP32" or -1 in outputs[0].dims:
        shown = f"{outputs[0].data_type} {list(outputs[0].dims)}" if outputs else "no output"
        raise DataError(f"{name}: expected a float32 first output of fixed size (logits or features: the pipeline "
                        f"answers withheld rows with NaN of that shape), got {shown}")
    return graph


def parse_triton_config(text_or_path):
    """A ``config.pbtxt`` (text or path) parsed against Triton's ``inference.ModelConfig`` schema; an unknown
    field, a wrong enum value or a syntax error raises ``google.protobuf.text_format.ParseError``."""
    from google.protobuf import text_format

    from trojanguard.guard._triton_server_config import model_config_class

    text = Path(text_or_path).read_text(encoding="utf-8") if isinstance(text_or_path, Path) else str(text_or_path)
    return text_format.Parse(text, model_config_class()())


def check_triton_repository(repository: str | Path, model_name: str = DEFAULT_MODEL_NAME, *, version: int = 1):
    """Parse ``<repository>/<model_name>/config.pbtxt`` and check it against ``<version>/model.onnx``: names, data
    types and dims of every input and output, a positive ``max_batch_size``, dynamic batching; a Python-backend
    model needs its ``model.py`` (and a pipeline the models it calls). Returns the parsed configuration; raises
    :class:`~trojanguard.errors.DataError` naming the first mismatch."""
    model_dir = Path(repository) / model_name
    config_path, graph_path = model_dir / "config.pbtxt", model_dir / str(version) / MODEL_FILE
    if not config_path.is_file():
        raise DataError(f"Triton repository: missing {config_path}")
    config = parse_triton_config(config_path)
    where = str(config_path)
    if config.name and config.name != model_name:
        raise DataError(f"{where}: name {config.name!r} differs from its folder {model_name!r} (Triton refuses it)")
    if config.max_batch_size < 1:
        raise DataError(f"{where}: max_batch_size {config.max_batch_size}; expected >= 1 for batching")
    if not config.HasField("dynamic_batching"):
        raise DataError(f"{where}: no dynamic_batching block")
    if config.backend not in BACKENDS and config.platform != "onnxruntime_onnx":
        raise DataError(f"{where}: backend {config.backend!r} / platform {config.platform!r}; expected one of "
                        f"{BACKENDS}")
    if config.backend == "python":
        for file in (PYTHON_MODEL_FILE, triton_models.COMMON_NAME + ".py"):
            if not (model_dir / str(version) / file).is_file():
                raise DataError(f"Triton repository: missing {model_dir / str(version) / file}")
        if "production_model" in config.parameters:  # a pipeline: its two graphs, or the two models it calls
            if config.parameters["pipeline_mode"].string_value == "in_process":
                shared = config.parameters["shared_forward"].string_value == "true"
                for name in PIPELINE_GRAPHS[:1] if shared else PIPELINE_GRAPHS:
                    if not (model_dir / str(version) / name).is_file():
                        raise DataError(f"Triton repository: missing {model_dir / str(version) / name}")
                return config
            for key in ("guard_model", "production_model"):
                called = config.parameters[key].string_value
                if not (Path(repository) / called / "config.pbtxt").is_file():
                    raise DataError(f"{where}: {key} {called!r} is not in the repository {repository}")
            return config
    if not graph_path.is_file():
        raise DataError(f"Triton repository: missing {graph_path}")
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
                         instance_kind="auto", instance_count=1, backend="onnxruntime") -> None:
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
    check_choice("backend", backend, BACKENDS)
