"""Triton Python-backend model written by trojanguard: runs ``model.onnx`` (beside this file) with ONNX Runtime.

Serves a guard graph (``input -> logits|features, score, flagged``) or a production model. The requests of a
dynamic batch run as one session call; a request whose images are not finite (or are 0–255 pixels, when the
``pixel_cutoff`` parameter is set) gets an error of its own and the rest of the batch is served. Parameters (in
``config.pbtxt``): ``python_path`` (directories holding NumPy and ONNX Runtime), ``intra_op_threads`` (0: ONNX
Runtime's default), ``pixel_cutoff``. GPU instances use ONNX Runtime's CUDA provider when it is installed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trojanguard_triton_common as common  # copied beside this file

common.extend_sys_path(__file__)
common.quiet_consumed_capsules()


class TritonPythonModel:
    def initialize(self, args):
        global np, pb_utils
        config, parameters = common.read_config(args)
        import numpy as np
        import triton_python_backend_utils as pb_utils

        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.onnx")
        self.session = common.onnx_session(path, parameters, args)
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        self.pixel_cutoff = common.pixel_cutoff(parameters)

    def execute(self, requests):
        batch, counts, errors = common.split_requests(pb_utils, np, requests, self.input_name, self.pixel_cutoff)
        results = None
        if batch is not None:
            try:
                results = self.session.run(self.output_names, {self.input_name: batch})
            except Exception as exc:  # noqa: BLE001 — answer every request with the runtime's message, stay up
                errors[None] = f"onnxruntime: {' '.join(str(exc).split())[:300]}"
        return common.respond(pb_utils, requests, counts, errors, self.output_names, results)
