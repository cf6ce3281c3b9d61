"""Triton python-backend model that runs `model.onnx` from its version folder with ONNX Runtime.

This is the CPU target's stand-in for Triton's onnxruntime backend (not in the Triton build that
runs here). Config parameters: `intra_op_threads` (default 1), `pad_axis1` (comma-separated input
names right-padded to the longest in a merged batch), `length_buckets` (a right-padded mask input:
regroup merged rows by real length; see serving/onnx_runner.py) and `call_cost_tokens`.

A version folder holding `adapter_bank.json` is the transformer with the adapter branch (issue 27):
it runs through serving.adapter_runner, which loads the adapters its rows name from the adapter
store beside the model repository into `adapter_slots` bank slots.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from common.adapter_bank import DEFAULT_SLOTS, BankLayout
from common.adapter_store import adapters_dir
from contract.specs import ADAPTER_SLOTS_PARAMETER
from serving.adapter_runner import AdapterRunner, run_checked
from serving.onnx_runner import BatchedOnnxRunner, config_parameters, runner_from_parameters


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.input_names = [i["name"] for i in config["input"]]
        parameters = config_parameters(config)
        self.adapters: AdapterRunner | None = None
        if BankLayout.exists(version_dir):
            from serving.adapter_session import AdapterSession

            slots = int(parameters.get(ADAPTER_SLOTS_PARAMETER) or DEFAULT_SLOTS)
            threads = int(parameters.get("intra_op_threads", "1"))
            session = AdapterSession(version_dir / "model.onnx", slots, threads)
            # args["model_repository"] is this model's folder; the store lies beside the repository.
            self.adapters = AdapterRunner(session, adapters_dir(Path(args["model_repository"]).parent))
            self.runner = BatchedOnnxRunner(self.adapters)  # type: ignore[arg-type]  (the session face)
        else:
            self.runner = runner_from_parameters(version_dir / "model.onnx", parameters)

    def execute(self, requests: list) -> list:
        feeds = []
        for r in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(r, name) for name in self.input_names}
            feeds.append({name: t.as_numpy() for name, t in tensors.items() if t is not None})  # optional ones absent
        try:
            if self.adapters is not None:
                outputs = run_checked(self.runner.run, self.adapters.check_request, feeds)
            else:
                outputs = self.runner.run(feeds)
        except Exception as e:  # a bad batch fails its requests, never the model instance
            err = pb_utils.TritonError(f"onnxruntime failed: {e}")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        return [_response(out) for out in outputs]


def _response(out: dict | Exception):
    if isinstance(out, ValueError):  # an adapter this request names that this model cannot use
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(out), pb_utils.TritonError.INVALID_ARG))
    if isinstance(out, Exception):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime failed: {out}"))
    return pb_utils.InferenceResponse([pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in out.items()])
