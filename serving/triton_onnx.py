"""Triton python-backend model that runs `model.onnx` from its version folder with ONNX Runtime.

This is the CPU target's stand-in for Triton's onnxruntime backend (not in the Triton build that
runs here). Config parameters: `intra_op_threads` (default 1), `pad_axis1` (comma-separated input
names right-padded to the longest in a merged batch), `length_buckets` (a right-padded mask input:
regroup merged rows by real length; see serving/onnx_runner.py) and `call_cost_tokens`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.onnx_runner import config_parameters, runner_from_parameters


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.input_names = [i["name"] for i in config["input"]]
        self.runner = runner_from_parameters(version_dir / "model.onnx", config_parameters(config))

    def execute(self, requests: list) -> list:
        feeds = [
            {name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names} for r in requests
        ]
        try:
            outputs = self.runner.run(feeds)
        except Exception as e:  # a bad batch fails its requests, never the model instance
            err = pb_utils.TritonError(f"onnxruntime failed: {e}")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in out.items()])
            for out in outputs
        ]
