"""Triton Python-backend model written by trojanguard: the guard in front of the production model.

Business-logic scripting: each dynamic batch goes to the guard model (``score``, ``flagged``) and, by the
``policy`` parameter, to the production model —

- ``flag``: every input is passed on; the guard and the production model run concurrently, so the guard adds
  latency only where it is slower than the production model;
- ``reject``: the guard runs first and the production model sees only the inputs it did not flag; flagged rows
  are answered with NaN outputs (withheld, as a guard graph's ``reject`` policy does) and never reach it.

One request in; the production model's output (named as the guard's first output), ``score`` and ``flagged``
out. A request whose images are not finite (or 0–255 pixels) gets an error of its own; an error of either model
fails the batch with that model's message. Parameters: ``guard_model``, ``guard_input``, ``production_model``,
``production_input``, ``production_output``, ``policy``, ``python_path``, ``pixel_cutoff``.
"""

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trojanguard_triton_common as common  # copied beside this file

common.extend_sys_path(__file__)
common.quiet_consumed_capsules()

GUARD_OUTPUTS = ("score", "flagged")


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
        self.output_dims = [int(d) for d in config["output"][0]["dims"]]
        self.guard, self.guard_input = parameters["guard_model"], parameters["guard_input"]
        self.production, self.production_input = parameters["production_model"], parameters["production_input"]
        self.production_output = parameters["production_output"]
        self.policy = parameters["policy"]
        if self.policy not in ("flag", "reject"):
            raise ValueError(f"policy: expected 'flag' or 'reject', got {self.policy!r}")
        self.pixel_cutoff = common.pixel_cutoff(parameters)

    async def execute(self, requests):
        batch, counts, errors = common.split_requests(pb_utils, np, requests, self.input_name, self.pixel_cutoff)
        results = None
        if batch is not None:
            try:
                results = await self.serve(batch)
            except PipelineError as exc:
                errors[None] = str(exc)
        return common.respond(pb_utils, requests, counts, errors, self.output_names, results)

    async def serve(self, x):
        """``[production output, score, flagged]`` for the batch ``x``."""
        guard = self.call(self.guard, self.guard_input, x, GUARD_OUTPUTS)
        if self.policy == "flag":
            (score, flagged), (served,) = await asyncio.gather(
                guard, self.call(self.production, self.production_input, x, (self.production_output,)))
            return [served, score, flagged]
        score, flagged = await guard
        keep = ~flagged
        served = None
        if keep.any():
            (answered,) = await self.call(self.production, self.production_input, np.ascontiguousarray(x[keep]),
                                          (self.production_output,))
            served = np.full((len(x), *answered.shape[1:]), np.nan, dtype=answered.dtype)
            served[keep] = answered
        else:
            served = np.full((len(x), *self.output_dims), np.nan, dtype=np.float32)
        return [served, score, flagged]

    async def call(self, model, input_name, x, outputs):
        """The named outputs of ``model`` on ``x`` (Triton's in-server call); its error raises PipelineError."""
        request = pb_utils.InferenceRequest(model_name=model, requested_output_names=list(outputs),
                                            inputs=[common.to_tensor(pb_utils, input_name, x)])
        response = await request.async_exec()
        if response.has_error():
            raise PipelineError(f"{model}: {response.error().message()}")
        values = [common.to_numpy(np, pb_utils.get_output_tensor_by_name(response, name)) for name in outputs]
        return [v.reshape(len(x)) if name in GUARD_OUTPUTS else v for name, v in zip(outputs, values)]
