"""A TorchScript module or a ``torch.export`` program behind an ordinary ``nn.Module``.

Both kinds refuse parts of the ``nn.Module`` interface the SDK uses on any model (``requires_grad_`` and
forward hooks on ScriptModules, ``train()`` / ``eval()`` on exported programs), and their layers cannot be
hooked because they run as one compiled graph. :class:`CompiledModel` wraps one at load time so detectors,
screening and the guard see a normal module: always in eval mode, forward and input gradients only, its
weights never trained, its layers hidden (feature detectors use its output, the logits, as the feature).
"""

from __future__ import annotations

import torch
from torch import nn

from trojanguard.errors import DataError

KINDS = ("torchscript", "torch.export")


class CompiledModel(nn.Module):
    """``forward(x)`` runs the compiled ``program`` unchanged; ``train()`` / ``eval()`` only set the flag.

    Args:
        program: a ``torch.jit.ScriptModule`` or the module of a ``torch.export.ExportedProgram``.
        kind: ``"torchscript"`` or ``"torch.export"`` (named in error messages).
        input_shape: the input shape a program was exported with; ``None`` entries are dynamic. A fixed
            batch size is served by running the input in chunks of that size (the last one padded).
        source: the file it came from (named in error messages).
    """

    def __init__(self, program: nn.Module, kind: str, *, input_shape: tuple[int | None, ...] | None = None,
                 source: str = "model"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        for parameter in program.parameters():  # frozen before any copy: deepcopy of a ScriptModule clones
            parameter.requires_grad_(False)       # parameters that require grad into non-leaf tensors
        self.program, self.kind, self.input_shape, self.source = program, kind, input_shape, source
        self.training = False

    def train(self, mode: bool = True) -> CompiledModel:
        """Only the flag: a compiled program keeps the mode it was compiled in (eval, for a classifier)."""
        self.training = mode
        return self

    def requires_grad_(self, requires_grad: bool = True) -> CompiledModel:
        """A no-op for ``False`` (the weights are frozen); ``True`` raises: a compiled program is not trained."""
        if requires_grad:
            raise RuntimeError(f"{self.source}: a {self.kind} program cannot be trained; load its weights as a "
                               "state dict with an architecture instead")
        return self

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, source={self.source!r}, input_shape={self.input_shape}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shape is None:
            return self.program(x)
        self._check_shape(x)
        batch = self.input_shape[0]
        if batch is None or len(x) == batch:
            return self.program(x)
        outputs = []
        for start in range(0, len(x), batch):
            chunk = x[start:start + batch]
            size = len(chunk)
            if size < batch:  # eval mode: samples are independent, so padding does not change the real rows
                chunk = torch.cat([chunk, chunk[-1:].expand(batch - size, *chunk.shape[1:])])
            outputs.append(self.program(chunk)[:size])
        return torch.cat(outputs)

    def _check_shape(self, x: torch.Tensor) -> None:
        expected = self.input_shape
        if x.dim() != len(expected) or any(e is not None and e != s for e, s in zip(expected[1:], x.shape[1:])):
            shown = ", ".join("N" if i == 0 else ("?" if e is None else str(e)) for i, e in enumerate(expected))
            raise DataError(f"{self.source}: the {self.kind} program takes inputs of shape ({shown}), got "
                            f"{tuple(x.shape)}")


def exported_input_shape(program) -> tuple[int | None, ...] | None:
    """Shape of the first user input of a ``torch.export.ExportedProgram`` (symbolic sizes as None)."""
    names = program.graph_signature.user_inputs
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                return None
            return tuple(d if isinstance(d, int) else None for d in value.shape)
    return None


def is_compiled(model: nn.Module) -> bool:
    """True for a :class:`CompiledModel` (or a bare ScriptModule): its layers cannot be hooked or trained."""
    return isinstance(model, (CompiledModel, torch.jit.ScriptModule))
