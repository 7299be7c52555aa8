"""Export a :class:`~trojanguard.guard.Guard` to one ONNX graph with outputs ``logits``, ``score``, ``flagged``.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. It runs on every torch this
package supports (2.4 … 2.14 tested) with no extra dependency, traces the forward hook that keeps the
feature, and takes ``dynamic_axes`` for the batch. The torch.export-based exporter (the default since
torch 2.9) needs ``onnxscript`` and is used only when asked (``exporter="dynamo"``) or when the TorchScript
exporter is missing from the installed torch.

Metadata (``metadata_props``, all strings; JSON where structured) — what a server needs to feed the graph:
``trojanguard.version``, ``trojanguard.threshold``, ``trojanguard.policy``, ``trojanguard.input_shape``
(``[C, H, W]``), ``trojanguard.input_range`` (``[low, high]`` or null), ``trojanguard.input_dtype``,
``trojanguard.normalization`` (what the graph applies itself, found in the model, or what the caller
states), ``trojanguard.detector``, ``trojanguard.outputs``, ``trojanguard.exporter``, ``trojanguard.torch``.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from trojanguard.data.core import check_images
from trojanguard.errors import DataError, ModelLoadError, check_choice
from trojanguard.guard.module import Guard
from trojanguard.models import CompiledModel, Normalize

DEFAULT_OPSET = 17  # ONNX Runtime ≥ 1.12 and every supported torch's TorchScript exporter
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "score", "flagged")
ENCODER_OUTPUT_NAMES = ("features", "score", "flagged")  # an encoder-only guard (Guard(encoder, PoisonCAM))
EXPORTERS = ("auto", "torchscript", "dynamo")
METADATA_PREFIX = "trojanguard."
REQUIRED_METADATA = ("threshold", "input_shape", "input_range", "policy")  # what a server needs to feed the graph
MIN_OPSET = 11  # the guard's Where / Equal on floats need opset 11


def supported_opsets() -> range:
    """Opsets :func:`export_onnx` can write: MIN_OPSET up to the newest the installed torch exporter and onnx know."""
    import onnx

    try:
        from torch.onnx._constants import ONNX_MAX_OPSET as torch_max
    except ImportError:  # private module moved: trust onnx alone
        torch_max = onnx.defs.onnx_opset_version()
    return range(MIN_OPSET, min(torch_max, onnx.defs.onnx_opset_version()) + 1)


def check_opset(opset, name: str = "opset") -> int:
    """``opset`` when :func:`export_onnx` can write it, else a ValueError naming the supported range."""
    opsets = supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in opsets:
        raise ValueError(f"{name}: expected an ONNX opset from {opsets.start} to {opsets.stop - 1}, got {opset!r}")
    return opset


def export_onnx(guard: Guard, path: str | Path, example: torch.Tensor, dynamic_batch: bool = True,
                opset: int = DEFAULT_OPSET, *, exporter: str = "auto", normalization: str | dict = "auto") -> Path:
    """Write ``guard`` as one ONNX graph ``input -> (logits, score, flagged)`` (an encoder's guard: ``features``
    first) to ``path`` and return the path.

    Args:
        guard: a calibrated :class:`Guard` (its threshold is baked into the graph).
        path: the ``.onnx`` file to write.
        example: ``(N, C, H, W)`` float32 images in the guard's input range; fixes C, H, W (and N when
            ``dynamic_batch`` is False).
        dynamic_batch: the batch axis of the input and every output is symbolic (``"batch"``).
        opset: ONNX opset version.
        exporter: ``"auto"`` (TorchScript-based when available, else torch.export-based), ``"torchscript"``
            or ``"dynamo"``.
        normalization: recorded in the metadata; ``"auto"`` records the mean/std of any
            :class:`~trojanguard.models.Normalize` inside the model (applied by the graph itself), or that
            the graph takes the pixels as they are.
    """
    import onnx

    import trojanguard

    if not isinstance(guard, Guard):
        raise TypeError(f"guard: expected a trojanguard.guard.Guard, got {type(guard).__name__}")
    if guard.threshold is None:
        raise RuntimeError("guard: no threshold to bake into the graph; call guard.calibrate(clean_x, fpr=...) first")
    check_choice("exporter", exporter, EXPORTERS)
    check_opset(opset)
    _check_example(example)
    if guard.input_range == (0.0, 1.0):
        check_images(example, "example")
    if guard.input_shape is not None and tuple(example.shape[1:]) != tuple(guard.input_shape):
        raise DataError(f"example: expected images of shape {tuple(guard.input_shape)} (the detector's reference "
                        f"data), got {tuple(example.shape[1:])}")
    example = _example_for_compiled(guard, example)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(iter(guard.buffers())).device
    example = example.to(device)
    guard.eval()
    if exporter == "auto":
        exporter = "torchscript" if _has_torchscript_exporter() else "dynamo"
    with torch.no_grad():
        guard(example)  # fails here, with the model's own message, if the model cannot take the example
        if exporter == "torchscript":
            _export_torchscript(guard, example, path, dynamic_batch, opset)
        else:
            _export_dynamo(guard, example, path, dynamic_batch, opset)

    model = onnx.load(str(path))
    metadata = {
        "version": trojanguard.__version__,
        "threshold": repr(float(guard.threshold)),
        "policy": guard.policy,
        "input_shape": json.dumps(list(example.shape[1:])),
        "input_range": json.dumps(None if guard.input_range is None else list(guard.input_range)),
        "input_dtype": "float32",
        "normalization": json.dumps(_normalization(guard) if normalization == "auto" else normalization),
        "detector": repr(guard.detector),
        "outputs": ",".join(guard.output_names),
        "exporter": exporter,
        "torch": torch.__version__,
    }
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        key = METADATA_PREFIX + key
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def export_model_onnx(model: nn.Module, path: str | Path, example: torch.Tensor, *, opset: int = DEFAULT_OPSET,
                      output_name: str = "logits") -> Path:
    """Write a plain model (a classifier: ``input -> logits``) as an ONNX graph with a dynamic batch axis — the
    production model a served guard is put in front of (``write_triton_repository(production_model=...)``)."""
    check_opset(opset)
    _check_example(example)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = example.to(next(iter(model.parameters())).device)
    with torch.no_grad():
        model(example)  # fails here, with the model's own message, if the model cannot take the example
        if _has_torchscript_exporter():
            _export_torchscript(model, example, path, True, opset, [output_name])
        else:
            _export_dynamo(model, example, path, True, opset, [output_name])
    return path


def read_metadata(model_or_path) -> dict[str, object]:
    """The ``trojanguard.*`` metadata of an ONNX model (object or path), JSON values decoded."""
    import onnx

    model = onnx.load(str(model_or_path), load_external_data=False) if isinstance(model_or_path, (str, Path)) \
        else model_or_path
    return decode_metadata({p.key: p.value for p in model.metadata_props})


def load_onnx_file(path: str | Path, name: str, what: str = "an ONNX model"):
    """The checked ``onnx.ModelProto`` at ``path``; a missing, empty, truncated or corrupt file raises a DataError
    naming ``name`` and ``what`` was expected."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{name}: expected {what} file, got {str(path)!r} ("
                        f"{'a folder' if path.is_dir() else 'no such file'})")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 — protobuf / checker errors of every kind mean an unreadable graph
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"{name}: expected {what}, got {str(path)!r}, which ONNX cannot read "
                        f"(empty, truncated or not ONNX: {reason})") from None
    return model


def load_guard_graph(path: str | Path, name: str = "path"):
    """The ``onnx.ModelProto`` at ``path`` when it is a guard graph written by :func:`export_onnx`; a missing,
    empty, truncated or corrupt file, or an ordinary (unguarded) ONNX model, raises a DataError naming ``name``."""
    model = load_onnx_file(path, name, "an ONNX guard graph")
    try:
        metadata = read_metadata(model)
    except ValueError as exc:  # a JSON value that does not decode
        raise DataError(f"{name}: {str(path)!r} has unreadable trojanguard metadata ({exc})") from None
    check_guard_graph(f"{name}: {str(path)!r}", [o.name for o in model.graph.output], metadata)
    return model


def check_guard_graph(where: str, outputs: list[str], metadata: dict[str, object]) -> None:
    """A DataError unless ``outputs`` and ``metadata`` are those of a graph written by :func:`export_onnx`."""
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing or list(outputs) not in (list(OUTPUT_NAMES), list(ENCODER_OUTPUT_NAMES)):
        raise DataError(f"{where}: expected a trojanguard guard graph (outputs {', '.join(OUTPUT_NAMES)} or "
                        f"{', '.join(ENCODER_OUTPUT_NAMES)}, and "
                        f"trojanguard.* metadata, written by trojanguard export / export_onnx), got outputs "
                        f"{list(outputs)} and missing metadata {missing} — an ordinary classifier? Export the guard "
                        "from the model's weights first")


def decode_metadata(props: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in props.items():
        if not key.startswith(METADATA_PREFIX):
            continue
        key = key[len(METADATA_PREFIX):]
        if key in ("input_shape", "input_range", "normalization"):
            value = json.loads(value)
        elif key == "threshold":
            value = float(value)
        out[key] = value
    return out


def _normalization(guard: Guard) -> dict[str, object]:
    found = [m for m in guard.scorer.model.modules() if isinstance(m, Normalize)]
    if not found:
        return {"in_graph": False, "note": "no trojanguard Normalize in the model: the graph takes the pixels as they are"}
    return {"in_graph": True, "mean": found[0].mean.flatten().tolist(), "std": found[0].std.flatten().tolist()}


def _example_for_compiled(guard: Guard, example: torch.Tensor) -> torch.Tensor:
    """Refuse a TorchScript model (the ONNX tracer cannot enter a loaded ScriptModule); give a torch.export
    program with a fixed batch size an example of exactly that size, so the trace calls it directly."""
    model = guard.scorer.model
    if not isinstance(model, CompiledModel):
        return example
    if model.kind == "torchscript":
        raise ModelLoadError(f"{model.source}: expected a PyTorch module or a torch.export (.pt2) program, got a "
                             "TorchScript model, which the ONNX exporter cannot trace inside the guard; load its "
                             "weights as a state dict with an architecture (CLI: --arch), or save it with "
                             "torch.export")
    batch = model.input_shape[0] if model.input_shape else None
    if batch is None or len(example) == batch:
        return example
    return example[torch.arange(batch) % len(example)]


def _check_example(example) -> None:
    if not isinstance(example, torch.Tensor) or example.dim() != 4 or example.dtype != torch.float32:
        shown = f"{example.dtype} {tuple(example.shape)}" if isinstance(example, torch.Tensor) else type(example).__name__
        raise DataError(f"example: expected a float32 tensor (N, C, H, W), got {shown}")


def _has_torchscript_exporter() -> bool:
    """The TorchScript-based exporter lives in ``torch.onnx.utils`` (deprecated since torch 2.9)."""
    try:
        import torch.onnx.utils  # noqa: F401
    except ImportError:
        return False
    return True


def _export_torchscript(guard: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool, opset: int,
                        output_names=None) -> None:
    output_names = list(guard.output_names if output_names is None else output_names)
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)} if dynamic_batch else None
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # chosen on purpose (module docstring)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(guard, (example,), str(path), input_names=[INPUT_NAME], output_names=output_names,
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True, **kwargs)


def _export_dynamo(guard: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool, opset: int,
                   output_names=None) -> None:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    program = torch.onnx.export(guard, (example,), dynamo=True, input_names=[INPUT_NAME],
                                output_names=list(guard.output_names if output_names is None else output_names), dynamic_shapes=shapes, opset_version=opset)
    program.save(str(path))
