"""Triton python-backend model `generate_stream`: `generate` with a response per denoising step.

Decoupled: every request gets one response per step carrying (step, total, elapsed_s), then a
final response with the image as well. The pipeline, its pinned component versions and its
per-step transformer batching are `generate`'s own (this class reuses its initialisation); only
the way results leave differs, so the unary contract stays untouched.

A client that goes away cancels its gRPC stream; Triton then marks the request cancelled, and
the loop checks that after every step and stops, so an abandoned generation frees its instance
and stops feeding the transformer within one step.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from contract.codec import read_params
from contract.specs import GENERATE_STREAM
from serving.triton_generate import ComponentError
from serving.triton_generate import TritonPythonModel as UnaryGenerateModel

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The client cancelled the request; the loop stops at the step where it noticed."""


def progress_tensors(step: int, total: int, elapsed_s: float) -> list:
    return [
        pb_utils.Tensor(GENERATE_STREAM.outputs[0].name, np.array([step], dtype=np.int32)),
        pb_utils.Tensor(GENERATE_STREAM.outputs[1].name, np.array([total], dtype=np.int32)),
        pb_utils.Tensor(GENERATE_STREAM.outputs[2].name, np.array([elapsed_s], dtype=np.float32)),
    ]


def error_response(message: str, code=None):
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=err)


class TritonPythonModel(UnaryGenerateModel):
    def execute(self, requests: list) -> None:
        for request in requests:  # max_batch_size 0: one request per loop, instances run in parallel
            sender = request.get_response_sender()
            try:
                self._run(request, sender)
            except Exception:  # never crash the instance: fail this request only
                log.exception("generate_stream failed")
                sender.send(error_response("generation failed"), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _run(self, request, sender) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def get(name: str) -> np.ndarray | None:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        try:
            req = read_params(get)
            self.memory_guard(req)  # initialised by `generate`'s initialize, from this model's config
            req, adapter, transformer_extra = self.adapters.resolve(req)
        except ValueError as e:
            sender.send(error_response(str(e), pb_utils.TritonError.INVALID_ARG), flags=final)
            return
        started = time.perf_counter()
        last = {"step": 0, "total": req.steps}

        def on_step(step: int, total: int) -> None:
            if request.is_cancelled():
                raise Cancelled(f"cancelled after step {step} of {total}")
            last.update(step=step, total=total)
            sender.send(pb_utils.InferenceResponse(progress_tensors(step, total, time.perf_counter() - started)))

        try:
            if request.is_cancelled():
                raise Cancelled("cancelled before it started")
            image = self.loop(req, on_step=on_step, transformer_extra=transformer_extra)
        except Cancelled as e:
            log.info("generate_stream: %s", e)
            # Nobody may be listening any more; the final flag still releases the request.
            code = getattr(pb_utils.TritonError, "CANCELLED", pb_utils.TritonError.UNAVAILABLE)
            sender.send(error_response(str(e), code), flags=final)
            return
        except ComponentError as e:
            sender.send(error_response(f"generation failed: {e}", pb_utils.TritonError.UNAVAILABLE), flags=final)
            return
        tensors = progress_tensors(last["step"], last["total"], time.perf_counter() - started)
        tensors.append(pb_utils.Tensor(GENERATE_STREAM.outputs[3].name, image))
        tensors += [pb_utils.Tensor(k, v) for k, v in adapter.output_arrays().items()]
        sender.send(pb_utils.InferenceResponse(tensors), flags=final)
