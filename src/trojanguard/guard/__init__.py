"""Guard: detector + model as one module / ONNX graph returning logits, suspicion score and flag."""

from trojanguard.guard.module import POLICIES, Guard, GuardOutput
from trojanguard.guard.onnx_export import export_onnx, read_metadata
from trojanguard.guard.session import GuardSession, resolve_providers

__all__ = ["POLICIES", "Guard", "GuardOutput", "GuardSession", "export_onnx", "read_metadata", "resolve_providers"]
