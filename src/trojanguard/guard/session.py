"""Serve an exported guard with ONNX Runtime: validated batches in, ``(logits, score, flagged)`` out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trojanguard.errors import DataError
from trojanguard.guard.module import GuardOutput
from trojanguard.guard.onnx_export import INPUT_NAME, check_guard_graph, decode_metadata

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def resolve_providers(providers: str | Sequence[str] = "auto") -> list[str]:
    """ONNX Runtime provider list: ``"auto"`` → CUDA then CPU when the CUDA provider is installed, else CPU;
    ``"cpu"``/``"cuda"`` or provider names are checked against the installed ones."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers == "auto":
        return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    names = [providers] if isinstance(providers, str) else list(providers)
    resolved = [PROVIDER_ALIASES.get(name, name) for name in names]
    missing = [name for name in resolved if name not in available]
    if missing:
        hint = (" (the CUDA provider comes with onnxruntime-gpu: pip install 'trojanguard[gpu]', and needs a GPU)"
                if "CUDAExecutionProvider" in missing else "")
        raise ValueError(f"providers: {missing} not available in this onnxruntime; available: {available}{hint}")
    return resolved


class GuardSession:
    """ONNX Runtime session of a graph written by :func:`~trojanguard.guard.export_onnx`.

    ``run(x)`` takes ``(N, C, H, W)`` float32 images (NumPy, torch, or nested lists of numbers) and returns a
    :class:`GuardOutput` of NumPy arrays. A wrong shape or dtype, a ragged list, strings, an empty batch or
    0–255 pixels raise :class:`~trojanguard.errors.DataError` naming what was expected (:meth:`validate`);
    single NaN, ±Inf and out-of-range values are not errors — the graph flags those inputs
    (``score = inf``), so one bad image does not fail a whole batch.

    Args:
        path: the ``.onnx`` file.
        providers: ``"auto"`` (CUDA when onnxruntime-gpu is installed, else CPU), ``"cpu"``, ``"cuda"`` or a
            list of ONNX Runtime provider names.
        session_options: an ``onnxruntime.SessionOptions`` (threads, optimisation level).
        batch_size: ``run`` splits larger inputs into runs of this many images (None: one run).
    """

    def __init__(self, path: str | Path, providers: str | Sequence[str] = "auto", *, session_options=None,
                 batch_size: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no ONNX file at {path}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size}")
        self.path, self.batch_size = path, batch_size
        self.session = ort.InferenceSession(str(path), sess_options=session_options,
                                            providers=resolve_providers(providers))
        self.metadata = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        check_guard_graph(f"path: {str(path)!r}", [o.name for o in self.session.get_outputs()], self.metadata)
        self.input_shape = tuple(self.metadata["input_shape"])
        self._outputs = [o.name for o in self.session.get_outputs()]  # logits or features, score, flagged
        fixed_batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = fixed_batch if isinstance(fixed_batch, int) else None
        bounds = self.metadata.get("input_range")  # 0–255 pixels are refused above 2 × high of a [0, high] range
        self._pixel_cutoff = 2 * float(bounds[1]) if bounds and bounds[0] == 0 and bounds[1] > 0 else None
        self._one_run = self.fixed_batch is None and batch_size is None  # run() makes one session call

    @property
    def providers(self) -> list[str]:
        """Providers the session actually runs on (in priority order)."""
        return self.session.get_providers()

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def policy(self) -> str:
        return str(self.metadata["policy"])

    def __repr__(self) -> str:
        return (f"GuardSession({str(self.path)!r}, providers={self.providers}, threshold={self.threshold:.4g}, "
                f"policy={self.policy!r}, input_shape={self.input_shape})")

    def run(self, x) -> GuardOutput:
        """``(logits (N, K) float32, score (N,) float32, flagged (N,) bool)`` as NumPy arrays (an encoder's guard:
        features (N, D) first)."""
        x = self.validate(x)
        if self._one_run or (self.fixed_batch is None and len(x) <= self.batch_size):  # batch 1: no slicing, no copies
            return GuardOutput(*self.session.run(self._outputs, {INPUT_NAME: x}))
        step = self.batch_size or len(x)
        if self.fixed_batch is not None:
            step = self.fixed_batch
        parts = [self.session.run(self._outputs, {INPUT_NAME: x[i : i + step]}) for i in range(0, len(x), step)]
        if len(parts) == 1:
            return GuardOutput(*parts[0])
        return GuardOutput(*(np.concatenate([p[j] for p in parts]) for j in range(len(self._outputs))))

    __call__ = run

    def validate(self, x) -> np.ndarray:
        """The batch as a contiguous float32 NumPy array, or a DataError saying what is wrong with it.

        Accepts a float32 NumPy array, a torch tensor or a nested list of numbers (converted to float32). Refused:
        other array dtypes, ragged lists, strings and other objects, a wrong shape, an empty batch, and a batch
        with finite values above ``2 × high`` of the input range — 0–255 pixels, which would otherwise all be
        flagged (score ``inf``) with no hint. Single NaN, ±Inf or out-of-range values are not errors: the graph
        flags those inputs, so one bad image does not fail the batch."""
        if (type(x) is np.ndarray and x.dtype == np.float32 and x.shape[1:] == self.input_shape and len(x)
                and x.flags.c_contiguous and (self.fixed_batch is None or len(x) % self.fixed_batch == 0)):
            self._check_pixel_scale(x)  # the common case: one comparison of the shape, one pass for the range
            return x
        shape = f"(N, {', '.join(map(str, self.input_shape))})"
        if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
            x = x.detach().cpu().numpy()
        elif isinstance(x, (list, tuple)):
            x = _array_of_numbers(x, shape)
        if not isinstance(x, np.ndarray):
            raise DataError(f"x: expected a float32 array {shape} (NumPy, torch or nested lists of numbers), got "
                            f"{type(x).__name__}")
        if x.dtype != np.float32:
            hint = " (scale integer pixels to [0, 1]: x.astype(np.float32) / 255)" if x.dtype.kind in "ui" else \
                " (convert with x.astype(np.float32))" if x.dtype.kind == "f" else ""
            raise DataError(f"x: expected float32 pixels, got {x.dtype}{hint}")
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            hint = " (a single image? add the batch axis: x[None])" if tuple(x.shape) == self.input_shape else ""
            raise DataError(f"x: expected shape {shape}, got {tuple(x.shape)}{hint}")
        if len(x) == 0:
            raise DataError("x: empty batch (N = 0)")
        if self.fixed_batch is not None and len(x) % self.fixed_batch:
            raise DataError(f"x: this graph was exported with a fixed batch of {self.fixed_batch}; got {len(x)} images")
        self._check_pixel_scale(x)
        return np.ascontiguousarray(x)

    def _check_pixel_scale(self, x: np.ndarray) -> None:
        """DataError for 0–255 pixels: a finite value above ``2 × high`` of the input range (only for a range
        starting at 0; values just above ``high`` are flagged per input by the graph)."""
        cutoff = self._pixel_cutoff
        if cutoff is None:
            return
        largest = float(x.max())  # one pass; NaN or inf only send us to the slower finite-only maximum
        if not np.isfinite(largest):
            finite = x[np.isfinite(x)]
            largest = float(finite.max()) if finite.size else -np.inf
        if largest > cutoff:
            raise DataError(f"x: expected float32 pixels in [0, {cutoff / 2:g}], got values up to "
                            f"{largest:.4g} (0–255 pixels? divide by 255)")


def _array_of_numbers(values, shape: str) -> np.ndarray:
    """A nested list of numbers as a float32 array; DataError for ragged lists, strings and other objects."""
    try:
        array = np.asarray(values)
    except (ValueError, TypeError) as exc:  # NumPy refuses ragged nesting
        raise DataError(f"x: expected a rectangular nested list of numbers {shape}, got a ragged one "
                        f"({str(exc).splitlines()[0][:120]})") from None
    if array.dtype.kind not in "biuf":
        kind = "a ragged or mixed nested list" if array.dtype.kind == "O" else f"{array.dtype.kind!r}-kind values " \
            f"({array.dtype}, e.g. strings)"
        raise DataError(f"x: expected a nested list of numbers {shape}, got {kind}")
    with np.errstate(over="ignore"):
        return array.astype(np.float32)
