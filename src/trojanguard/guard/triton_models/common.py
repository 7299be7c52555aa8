"""Shared by the Python-backend model files; copied beside them as ``trojanguard_triton_common.py``.

Stands alone (standard library only; NumPy and Triton's utilities are passed in once the model has put its
``python_path`` on ``sys.path``)."""

import json
import os
import re
import sys

PYTHON_PATH = re.compile(r'key:\s*"python_path"\s*value:\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"')


def extend_sys_path(model_file: str) -> None:
    """Put the directories of the model's ``python_path`` parameter (``os.pathsep``-separated; missing ones
    skipped) at the front of ``sys.path``. Read from ``config.pbtxt`` when ``model.py`` is imported, because the
    backend imports NumPy before ``initialize`` sees the configuration, and the embedded interpreter ignores
    ``PYTHONPATH``."""
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(model_file))), "config.pbtxt")
    try:
        with open(config, encoding="utf-8") as handle:
            found = PYTHON_PATH.search(handle.read())
    except OSError:
        return
    if found is None:
        return
    value = re.sub(r"\\(.)", r"\1", found.group(1))
    for entry in reversed(value.split(os.pathsep)):
        if entry and os.path.isdir(entry) and entry not in sys.path:
            sys.path.insert(0, entry)


def to_numpy(np, tensor):
    """A Triton tensor as a NumPy array through DLPack. ``Tensor.as_numpy()`` and ``Tensor(name, array)`` of a
    backend stub built against NumPy 1 misread NumPy 2 arrays (wrong values, empty outputs: measured with the
    nvidia-pytriton 0.7.0 stub); DLPack does not depend on NumPy's C layout. Older NumPy: ``as_numpy()``."""
    try:
        return np.from_dlpack(tensor)
    except (AttributeError, TypeError, BufferError, RuntimeError):
        return tensor.as_numpy()


def to_tensor(pb_utils, name: str, array):
    """A NumPy array as a Triton tensor through DLPack (see :func:`to_numpy`). DLPack cannot export a read-only
    array (what ``np.from_dlpack`` of a request's input gives): those are copied first."""
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = array.copy()
    try:
        return pb_utils.Tensor.from_dlpack(name, array.__dlpack__())
    except (AttributeError, TypeError, BufferError, RuntimeError):
        return pb_utils.Tensor(name, array)


def quiet_consumed_capsules() -> None:
    """The stub renames a DLPack capsule it consumed to a name NumPy's capsule destructor does not expect, which
    then reports a harmless ValueError for every output; keep those out of the server log (nothing else)."""
    previous = sys.unraisablehook

    def hook(info):
        if isinstance(info.exc_value, ValueError) and "PyCapsule_GetPointer" in str(info.exc_value):
            return
        previous(info)

    sys.unraisablehook = hook


def read_config(args: dict) -> tuple[dict, dict]:
    """The model's configuration and its ``parameters`` as plain strings."""
    config = json.loads(args["model_config"])
    parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
    return config, parameters


def input_problem(np, x, pixel_cutoff: float | None) -> str | None:
    """Why a request's images cannot be served, or None. Non-finite values and 0–255 pixels (a finite value
    above ``pixel_cutoff``, twice the top of the input range) fail that request alone, never the batch."""
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))
        return (f"input: expected finite pixel values, got NaN or Inf in image(s) {bad[:5].tolist()} of this "
                f"request of {len(x)}")
    if pixel_cutoff is not None and x.size and float(x.max()) > pixel_cutoff:
        return (f"input: expected pixels in [0, {pixel_cutoff / 2:g}], got values up to {float(x.max()):.4g} "
                "(0-255 pixels? divide by 255)")
    return None


def split_requests(pb_utils, np, requests, input_name: str, pixel_cutoff: float | None):
    """The requests' images as one batch (None when none is valid), the row count of each request, and an error
    message for each request that cannot be served."""
    arrays, counts, errors = [], [], {}
    for index, request in enumerate(requests):
        x = to_numpy(np, pb_utils.get_input_tensor_by_name(request, input_name))
        problem = input_problem(np, x, pixel_cutoff)
        if problem is None:
            arrays.append(np.ascontiguousarray(x, dtype=np.float32))
        else:
            errors[index] = problem
        counts.append(len(x))
    batch = None if not arrays else arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return batch, counts, errors


def respond(pb_utils, requests, counts, errors, names, results):
    """One response per request: its rows of every result, or its error (``results`` None: every request gets
    the message in ``errors[None]``)."""
    responses, offset = [], 0
    for index in range(len(requests)):
        if index in errors or results is None:
            message = errors.get(index, errors.get(None, "trojanguard: no result"))
            responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)))
            continue
        rows = slice(offset, offset + counts[index])
        offset += counts[index]
        responses.append(pb_utils.InferenceResponse(
            output_tensors=[to_tensor(pb_utils, name, value[rows]) for name, value in zip(names, results)]))
    return responses


def onnx_session(path: str, parameters: dict, args: dict):
    """An ONNX Runtime session of the graph at ``path``: ``intra_op_threads`` from the parameters (0: ONNX
    Runtime's default); on a GPU instance the CUDA provider (of that device) when installed, else the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(parameters.get("intra_op_threads") or 0)
    providers = ["CPUExecutionProvider"]
    if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = [("CUDAExecutionProvider", {"device_id": int(args.get("model_instance_device_id", 0))}),
                     "CPUExecutionProvider"]
    return ort.InferenceSession(path, options, providers=providers)


def pixel_cutoff(parameters: dict) -> float | None:
    """``pixel_cutoff`` parameter as a float (empty: no check)."""
    text = parameters.get("pixel_cutoff", "")
    return float(text) if text else None
