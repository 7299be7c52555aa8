import os
import tempfile

import pytest
import torch

# A shared model cache for the whole test session (zoo models are trained once, then reused).
os.environ.setdefault("TROJANGUARD_CACHE", os.path.join(tempfile.gettempdir(), "trojanguard-test-cache"))
os.environ.setdefault("TROJANGUARD_PROGRESS", "0")
# Without a GPU, Triton kernels are tested on CPU by the interpreter (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
