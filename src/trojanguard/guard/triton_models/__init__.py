"""Model files for Triton's Python backend, copied into a model repository as ``<model>/1/model.py`` by
:func:`trojanguard.guard.write_triton_repository`. They run inside the server's embedded interpreter, which has
neither trojanguard nor (often) the environment's packages: each file stands alone, needs only NumPy and ONNX
Runtime, and puts the directories of its ``python_path`` parameter on ``sys.path`` before importing them.
The package never imports those files; this module only names them."""

from pathlib import Path

ONNX_MODEL = Path(__file__).with_name("onnx_model.py")  # one ONNX graph run by ONNX Runtime (guard, production)
PIPELINE_MODEL = Path(__file__).with_name("pipeline_model.py")  # the guard in front of the production model (BLS)
COMMON = Path(__file__).with_name("common.py")  # copied beside each as COMMON_NAME + ".py"
COMMON_NAME = "trojanguard_triton_common"
