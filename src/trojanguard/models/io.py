"""Safe model loading: never runs code from the file unless the user opts in.

Accepted: safetensors state dicts and ``torch.load(weights_only=True)`` state dicts (both with an
architecture name), TorchScript archives and ``torch.export`` programs. Plain pickled modules only with
``allow_pickle=True``, which warns.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from trojanguard.errors import ModelLoadError
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


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def load_model(path: str | Path, arch: str | None = None, *, num_classes: int = 10, in_channels: int = 3,
               normalize=None, allow_pickle: bool = False, map_location: str = "cpu") -> nn.Module:
    """Load a model file safely; ``arch`` is required for state dicts (see :func:`build_model`)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    if path.suffix == ".pt2":
        program = torch.export.load(str(path))
        return program.module()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device=map_location)
    elif _is_torchscript(path):
        return torch.jit.load(str(path), map_location=map_location)
    else:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            if not allow_pickle:
                raise ModelLoadError(
                    f"model file {str(path)!r} is not a plain state dict ({type(exc).__name__}); loading it "
                    "would unpickle arbitrary code. Re-save it as safetensors, or pass allow_pickle=True "
                    "(CLI: --allow-pickle) only if you trust its source."
                ) from None
            warnings.warn(f"unpickling {path}: this can run arbitrary code from the file", stacklevel=2)
            obj = torch.load(path, map_location=map_location, weights_only=False)
            if isinstance(obj, nn.Module):
                return obj
            state = obj
    if isinstance(state, nn.Module):
        return state
    if not isinstance(state, dict):
        raise ModelLoadError(f"model file {str(path)!r}: expected a state dict, got {type(state).__name__}")
    if arch is None:
        raise ModelLoadError(f"model file {str(path)!r} holds a state dict: pass arch= to say which architecture")
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels, normalize=normalize)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"model file {str(path)!r} does not fit architecture {arch!r}: {exc}") from None
    return model.eval()
