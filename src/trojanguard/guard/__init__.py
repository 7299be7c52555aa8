"""Guard: detector + model as one module / ONNX graph returning logits, suspicion score and flag."""

from trojanguard.guard.module import POLICIES, Guard, GuardOutput
from trojanguard.guard.onnx_export import export_onnx, read_metadata
from trojanguard.guard.session import GuardSession, resolve_providers
from trojanguard.guard.triton_server import (
    check_triton_repository,
    parse_triton_config,
    triton_config,
    write_triton_repository,
)

__all__ = ["POLICIES", "Guard", "GuardOutput", "GuardSession", "check_triton_repository", "export_onnx",
           "parse_triton_config", "read_metadata", "resolve_providers", "triton_config", "write_triton_repository"]
