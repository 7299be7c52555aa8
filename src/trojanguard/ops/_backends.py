"""Backend registry and dispatch for the ops.

Each op is an :class:`Op` holding its pure-PyTorch reference and any faster implementations, each of
which answers ``not_supported_reasons(*inputs)``; each op declares its own backend priority (the order the
automatic choice tries). Dispatch order: explicit ``backend=`` argument → :func:`use_backend` context →
``TROJANGUARD_BACKEND`` environment variable → first available in the op's priority, ending at the
reference. Automatic choice never fails; asking for a backend that cannot run raises an error listing
every backend and why it was refused. Tracing/export and ``torch.use_deterministic_algorithms`` force
the reference. :func:`op_backend_availability` is the op × backend table that ``trojanguard info`` prints.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from trojanguard import _native
from trojanguard.errors import TrojanGuardError

BACKEND_NAMES = ("cuda", "triton", "cpp", "reference")
NOT_IMPLEMENTED = "not implemented for this op"
_state = threading.local()


class BackendUnavailableError(TrojanGuardError, RuntimeError):
    """An explicitly requested backend cannot run these inputs (a RuntimeError too, as it always was)."""


def _no_reasons(*args, **kwargs) -> list[str]:
    return []


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of an op.

    ``not_supported_reasons(*inputs)``: why it cannot run these inputs (checked on every call);
    ``machine_reasons()``: why it cannot run on this machine at all, beyond what the whole backend lacks
    (:func:`backend_reasons`), e.g. this op's kernel module is missing.
    """

    backend: str
    fn: Callable
    not_supported_reasons: Callable[..., list[str]]
    machine_reasons: Callable[[], list[str]] = _no_reasons


class Op:
    """One op: a reference plus registered implementations, selected per call in the op's ``priority`` (the
    backends automatic choice tries, in order; only the reference unless given)."""

    def __init__(self, name: str, reference: Callable, priority: tuple[str, ...] = ("reference",)):
        unknown = [b for b in priority if b not in BACKEND_NAMES]
        if unknown or len(set(priority)) != len(priority) or not priority or priority[-1] != "reference":
            raise ValueError(f"priority: expected distinct names of {BACKEND_NAMES} ending in 'reference', "
                             f"got {priority!r}")
        self.name = name
        self.priority = tuple(priority)
        self.implementations: dict[str, Implementation] = {
            "reference": Implementation("reference", reference, _no_reasons)
        }

    def register(self, backend: str, fn: Callable, not_supported_reasons: Callable[..., list[str]],
                 machine_reasons: Callable[[], list[str]] = _no_reasons) -> None:
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
        if backend not in self.priority:
            raise ValueError(f"backend: {backend!r} is not in op {self.name}'s priority {self.priority}")
        self.implementations[backend] = Implementation(backend, fn, not_supported_reasons, machine_reasons)

    def reasons(self, *args, **kwargs) -> dict[str, list[str]]:
        """Every backend and why it cannot run these inputs (empty list = it can)."""
        out = {}
        for name in BACKEND_NAMES:
            impl = self.implementations.get(name)
            out[name] = [NOT_IMPLEMENTED] if impl is None else impl.not_supported_reasons(*args, **kwargs)
        return out

    def availability(self) -> dict[str, list[str]]:
        """Every backend, in this op's order of preference, and why it cannot run this op on this machine at all
        (empty list = available)."""
        out = {}
        for name in (*self.priority, *(b for b in BACKEND_NAMES if b not in self.priority)):
            impl = self.implementations.get(name)
            out[name] = [NOT_IMPLEMENTED] if impl is None else backend_reasons(name) + impl.machine_reasons()
        return out

    def select(self, backend: str | None, *args, **kwargs) -> Implementation:
        requested = backend if backend not in (None, "auto") else _requested_backend()
        if _force_reference():
            return self.implementations["reference"]
        if requested is not None:
            if requested not in BACKEND_NAMES:
                raise ValueError(f"backend: expected 'auto' or one of {BACKEND_NAMES}, got {requested!r}")
            impl = self.implementations.get(requested)
            reasons = [NOT_IMPLEMENTED] if impl is None else impl.not_supported_reasons(*args, **kwargs)
            if reasons:
                table = "; ".join(f"{n}: {', '.join(r) or 'available'}" for n, r in self.reasons(*args, **kwargs).items())
                where = "backend" if backend not in (None, "auto") else (
                    "use_backend" if getattr(_state, "backend", None) else "TROJANGUARD_BACKEND")
                raise BackendUnavailableError(f"{where}: {requested!r} cannot run op {self.name} here ({table})")
            return impl
        for name in self.priority:
            if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
                continue  # the interpreter is for tests only: far slower than every other backend
            impl = self.implementations.get(name)
            if impl is not None and not impl.not_supported_reasons(*args, **kwargs):
                return impl
        return self.implementations["reference"]

    def __call__(self, *args, backend: str | None = None, **kwargs):
        return self.select(backend, *args, **kwargs).fn(*args, **kwargs)


OPS: dict[str, Op] = {}


def define_op(name: str, reference: Callable, *, priority: tuple[str, ...]) -> Op:
    """Register op ``name`` with its reference; ``priority``: the backends automatic choice tries, in order."""
    op = OPS[name] = Op(name, reference, priority)
    return op


def _requested_backend() -> str | None:
    return getattr(_state, "backend", None) or os.environ.get("TROJANGUARD_BACKEND") or None


def _force_reference() -> bool:
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
    return tracing or torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, ops use backend ``name`` (None or 'auto': automatic choice)."""
    previous = getattr(_state, "backend", None)
    _state.backend = None if name == "auto" else name
    try:
        yield
    finally:
        _state.backend = previous


def triton_reasons(*tensors: torch.Tensor) -> list[str]:
    """Why the Triton kernels cannot run on these tensors (shared by every Triton op)."""
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and not all(t.is_cuda for t in tensors):
        reasons.append("tensors are not on a CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU, slowly)")
    if interpret and any(t.is_cuda for t in tensors):
        reasons.append("TRITON_INTERPRET=1 runs on CPU tensors only")
    return reasons


def backend_reasons(backend: str) -> list[str]:
    """Why ``backend`` cannot run on this machine at all, whatever the op (empty list = available)."""
    if backend == "reference":
        return []
    if backend == "cpp":
        return _native.cpu_reasons()
    if backend == "cuda":
        return _native.cuda_reasons()
    if backend == "triton":
        probe = torch.empty(0, device="cuda") if torch.cuda.is_available() else torch.empty(0)
        return triton_reasons(probe)
    raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")


def backend_availability() -> dict[str, list[str]]:
    """Map each backend name to its list of reasons it is unavailable here, whatever the op (empty = available)."""
    return {name: backend_reasons(name) for name in BACKEND_NAMES}


def op_backend_availability() -> dict[str, dict[str, list[str]]]:
    """``{op: {backend: reasons}}`` for every registered op: why each backend cannot run it here (empty =
    available; a backend the op lacks says so)."""
    return {name: op.availability() for name, op in OPS.items()}
