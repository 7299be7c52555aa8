"""Triton Python-backend model written by trojanguard: the guard in front of the production model.

Each dynamic batch goes to the guard (``score``, ``flagged``) and, by the ``policy`` parameter, to the
production model —

- ``flag``: every input is passed on to both; ``in_process`` runs the guard on a thread of its own while the
  production model runs (ONNX Runtime releases the GIL): on two cores the guard then adds little latency beyond
  its own extra work (measured in benchmarks/triton_serving.py);
- ``reject``: the guard runs first and the production model sees only the inputs it did not flag; flagged rows
  are answered with NaN outputs (withheld, as a guard graph's ``reject`` policy does) and never reach it.

``pipeline_mode``: ``in_process`` runs both graphs (``guard.onnx``, ``production.onnx`` beside this file) in this
model's own ONNX Runtime sessions — one server hop, as the production model alone; with ``shared_forward`` (the
production model computes the guard graph's own first output, checked when the repository was written) only the
guard graph, whose output already follows the policy; ``bls`` calls the models
``guard_model`` and ``production_model`` of the repository (business-logic scripting: any backend or device can
serve them, at the cost of two more hops).

One request in; the production model's output (named as the guard's first output), ``score`` and ``flagged``
out. A request whose images are not finite (or 0–255 pixels) gets an error of its own; an error of either model
fails the batch with that model's message. Parameters: ``guard_model``, ``guard_input``, ``production_model``,
``production_input``, ``production_output``, ``policy``, ``pipeline_mode``, ``shared_forward``, ``python_path``,
``pixel_cutoff``,
``intra_op_threads``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trojanguard_triton_common as common  # copied beside this file

common.extend_sys_path(__file__)
common.quiet_consumed_capsules()

GUARD_OUTPUTS = ("score", "flagged")
GUARD_FILE, PRODUCTION_FILE = "guard.onnx", "production.onnx"  # the graphs an in_process pipeline runs itself


class PipelineError(Exception):
    """A model the pipeline calls answered with an error."""


class TritonPythonModel:
    def initialize(self, args):
        global np, pb_utils
        config, parameters = common.read_config(args)
        import numpy as np
        import triton_python_backend_utils as pb_utils

        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        served = config["output"][0]  # a batch-axis-only output is declared dims [1] with reshape []
        batch_only = "reshape" in served and not served["reshape"].get("shape")
        self.output_dims = [] if batch_only else [int(d) for d in served["dims"]]
        self.guard, self.guard_input = parameters["guard_model"], parameters["guard_input"]
        self.production, self.production_input = parameters["production_model"], parameters["production_input"]
        self.production_output = parameters["production_output"]
        self.policy = parameters["policy"]
        if self.policy not in ("flag", "reject"):
            raise ValueError(f"policy: expected 'flag' or 'reject', got {self.policy!r}")
        self.pixel_cutoff = common.pixel_cutoff(parameters)
        self.mode = parameters.get("pipeline_mode", "bls")
        self.shared = self.mode == "in_process" and parameters.get("shared_forward") == "true"
        self.sessions = {}
        if self.mode == "in_process":  # the graphs beside this file, run here: no in-server call, no extra hop
            import concurrent.futures

            folder = os.path.dirname(os.path.abspath(__file__))
            graphs = ((self.guard, GUARD_FILE),) + (() if self.shared else ((self.production, PRODUCTION_FILE),))
            self.sessions = {name: common.onnx_session(os.path.join(folder, file), parameters, args)
                             for name, file in graphs}
            self.guard_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="trojanguard-guard")
        elif self.mode != "bls":
            raise ValueError(f"pipeline_mode: expected 'bls' or 'in_process', got {self.mode!r}")

    def execute(self, requests):
        batch, counts, errors = common.split_requests(pb_utils, np, requests, self.input_name, self.pixel_cutoff)
        results = None
        if batch is not None:
            try:
                results = self.serve(batch)
            except PipelineError as exc:
                errors[None] = str(exc)
        return common.respond(pb_utils, requests, counts, errors, self.output_names, results)

    def finalize(self):
        if self.sessions:
            self.guard_thread.shutdown(wait=True)

    def serve(self, x):
        """``[production output, score, flagged]`` for the batch ``x``."""
        if self.shared:  # the production model is the guarded one: the guard graph's own output (policy applied)
            return self.call(self.guard, self.guard_input, x, (self.output_names[0], *GUARD_OUTPUTS))
        if self.policy == "flag" and self.sessions:  # the guard on its thread while the production model runs here
            guard = self.guard_thread.submit(self.call, self.guard, self.guard_input, x, GUARD_OUTPUTS)
            (served,) = self.call(self.production, self.production_input, x, (self.production_output,))
            score, flagged = guard.result()
            return [served, score, flagged]
        score, flagged = self.call(self.guard, self.guard_input, x, GUARD_OUTPUTS)
        if self.policy == "flag":
            (served,) = self.call(self.production, self.production_input, x, (self.production_output,))
            return [served, score, flagged]
        keep = ~flagged.astype(bool)
        if keep.any():
            (answered,) = self.call(self.production, self.production_input, np.ascontiguousarray(x[keep]),
                                          (self.production_output,))
            served = np.full((len(x), *answered.shape[1:]), np.nan, dtype=answered.dtype)
            served[keep] = answered
        else:
            served = np.full((len(x), *self.output_dims), np.nan, dtype=np.float32)
        return [served, score, flagged]

    def call(self, model, input_name, x, outputs):
        """The named outputs of ``model`` on ``x`` — its own session (``in_process``) or Triton's in-server call
        (``bls``); an error raises PipelineError."""
        if self.sessions:
            try:
                values = self.sessions[model].run(list(outputs), {input_name: x})
            except Exception as exc:  # noqa: BLE001 — the runtime's message becomes the requests' error
                raise PipelineError(f"{model}: onnxruntime: {' '.join(str(exc).split())[:300]}") from None
            return [v.reshape(len(x)) if name in GUARD_OUTPUTS else v for name, v in zip(outputs, values)]
        request = pb_utils.InferenceRequest(model_name=model, requested_output_names=list(outputs),
                                            inputs=[common.to_tensor(pb_utils, input_name, x)])
        response = request.exec()
        if response.has_error():
            raise PipelineError(f"{model}: {response.error().message()}")
        values = [common.to_numpy(np, pb_utils.get_output_tensor_by_name(response, name)) for name in outputs]
        return [v.reshape(len(x)) if name in GUARD_OUTPUTS else v for name, v in zip(outputs, values)]
