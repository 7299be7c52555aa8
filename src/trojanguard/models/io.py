"""Safe model loading: never runs code from the file unless the user opts in.

Accepted: safetensors state dicts and ``torch.load(weights_only=True)`` state dicts (both with an
architecture name), TorchScript archives and ``torch.export`` programs (wrapped in
:class:`~trojanguard.models.compiled.CompiledModel`). Plain pickled modules only with ``allow_pickle=True``,
which warns. Every model is checked for NaN / infinite weights before it is returned.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from trojanguard.errors import ModelLoadError
from trojanguard.models.compiled import CompiledModel, exported_input_shape
from trojanguard.models.nets import build_model


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Save ``model``'s state dict as safetensors (``.safetensors``) or a weights-only ``.pt``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


FOREIGN_FORMATS = (  # (leading bytes, what the file is) of files people hand in by mistake
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"), (b"\x93NUMPY", "a NumPy .npy array"),
)
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"  # pickle protocol ≥ 2: torch.save's legacy (non-zip) format


def model_sha256(model: nn.Module) -> str:
    """SHA-256 of the model's class name and state dict (names, dtypes, shapes, bytes): the model's identity in a
    screening run's records and in a fitted detector's file."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{t.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def _not_a_model(path: Path, head: bytes, detail: str = "") -> ModelLoadError:
    """The error for a file that is not a model file of any accepted kind (named by its leading bytes)."""
    name = str(path)
    if path.suffix == ".onnx":
        return ModelLoadError(f"model file {name!r}: expected a PyTorch model (safetensors / .pt state dict, "
                              "TorchScript, .pt2), got an ONNX graph; an exported guard graph is served with "
                              "trojanguard.guard.GuardSession or `trojanguard export --model FILE.onnx --triton-repo "
                              "DIR`, and cannot be screened or cleansed as a PyTorch model")
    kind = next((what for magic, what in FOREIGN_FORMATS if head.startswith(magic)), None)
    if not head:
        got = "an empty file"
    elif kind is not None:
        got = kind
    else:
        got = "a corrupt or truncated file, or another format" + (f" ({detail})" if detail else "")
    return ModelLoadError(f"model file {name!r}: expected a PyTorch model (safetensors / .pt state dict, "
                          f"TorchScript, .pt2), got {got}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].split('. ')[0][:160]}" if text else type(exc).__name__


def check_finite_weights(state: dict, source: str) -> None:
    """Raise :class:`ModelLoadError` naming ``source`` and the first tensor holding NaN or ±Inf."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelLoadError(f"{source}: expected finite weights, got NaN or infinite values in tensor "
                                 f"{name!r} ({bad} of {tensor.numel()} values); the model cannot give meaningful "
                                 "predictions")


def _load_exported(path: Path, map_location: str) -> nn.Module:
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(16)
        raise _not_a_model(path, head, "a .pt2 file is a zip archive written by torch.export.save")
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # torch logs the failure with a traceback before raising it
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 — any failure: the archive is not a loadable program
        raise ModelLoadError(f"model file {str(path)!r}: expected a torch.export program (.pt2), got an archive "
                             f"torch.export.load cannot read ({_first_line(exc)})") from None
    finally:
        export_log.setLevel(level)
    module = program.module().to(map_location)
    return CompiledModel(module, "torch.export", input_shape=exported_input_shape(program),
                         source=f"model file {str(path)!r}")


def load_model(path: str | Path, arch: str | None = None, *, num_classes: int = 10, in_channels: int = 3,
               normalize=None, allow_pickle: bool = False, map_location: str = "cpu") -> nn.Module:
    """Load a model file safely; ``arch`` is required for state dicts (see :func:`build_model`).

    TorchScript archives and ``torch.export`` programs come back wrapped in a
    :class:`~trojanguard.models.compiled.CompiledModel` (eval mode, not trainable). Raises
    :class:`ModelLoadError` naming the file for a missing, empty, corrupt or foreign file, and for weights
    holding NaN or infinite values.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    source = f"model file {str(path)!r}"
    with open(path, "rb") as f:
        head = f.read(16)
    if not head or any(head.startswith(magic) for magic, _ in FOREIGN_FORMATS) or path.suffix == ".onnx":
        raise _not_a_model(path, head)
    if path.suffix == ".pt2":
        model = _load_exported(path, map_location)
        check_finite_weights(model.state_dict(), source)
        return model
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device=map_location)
        except SafetensorError as exc:
            raise _not_a_model(path, head, f"not a valid safetensors file: {exc}") from None
    elif _is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch ≥ 2.9 deprecates TorchScript; loading it is still supported
                warnings.simplefilter("ignore", FutureWarning)
                script = torch.jit.load(str(path), map_location=map_location)
        except Exception as exc:  # noqa: BLE001 — any failure: a damaged archive
            raise _not_a_model(path, head, f"a TorchScript archive torch.jit.load cannot read: "
                                           f"{_first_line(exc)}") from None
        model = CompiledModel(script.eval(), "torchscript", source=source)
        check_finite_weights(model.state_dict(), source)
        return model
    elif not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        raise _not_a_model(path, head)
    else:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Unsupported global" not in str(exc) and "Unsupported operand" not in str(exc):
                raise _not_a_model(path, head, _first_line(exc)) from None
            if not allow_pickle:
                raise ModelLoadError(
                    f"model file {str(path)!r} is not a plain state dict (it holds pickled objects); loading it "
                    "would unpickle arbitrary code. Re-save it as safetensors, or pass allow_pickle=True "
                    "(CLI: --allow-pickle) only if you trust its source."
                ) from None
            warnings.warn(f"unpickling {path}: this can run arbitrary code from the file", stacklevel=2)
            state = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as exc:  # noqa: BLE001 — truncated zip, bad pickle stream, ...
            raise _not_a_model(path, head, _first_line(exc)) from None
    if isinstance(state, nn.Module):
        check_finite_weights(state.state_dict(), source)
        return state
    if not isinstance(state, dict):
        raise ModelLoadError(f"model file {str(path)!r}: expected a state dict, got {type(state).__name__}")
    check_finite_weights(state, source)
    if arch is None:
        raise ModelLoadError(f"model file {str(path)!r} holds a state dict: pass arch= to say which architecture")
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels, normalize=normalize)
    from trojanguard.ssl.backbones import BACKBONE_HEADS, build_backbone

    head = BACKBONE_HEADS.get(arch, (None, 0))[0]
    if head is not None and not any(key.startswith(head + ".") for key in state):
        model = build_backbone(arch, in_channels=in_channels)  # the arch without its head: an encoder's weights
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"model file {str(path)!r} does not fit architecture {arch!r}: {exc}") from None
    return model.eval()


def read_fit_file(path, argument: str, what: str) -> tuple[object, dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a detector fit written as safetensors with JSON metadata under ``"trojanguard"``
    (never unpickled): the metadata as decoded (None when absent). A missing or unreadable file is a
    ModelLoadError naming ``argument`` and ``what`` was expected ("a PoisonCAM fit written by PoisonCAM.save")."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{argument}: no file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("trojanguard", "null") or "null")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 — safe_open has no items()
    except Exception as exc:  # noqa: BLE001 — any parse failure of a foreign or truncated file
        raise ModelLoadError(f"{argument}: {path}: expected {what} (.safetensors), got an unreadable file "
                             f"({exc})") from None
    return meta, tensors
