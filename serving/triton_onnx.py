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

from common.ort_session import make_session
from serving.onnx_runner import BatchedOnnxRunner


def _param(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = int(_param(config, "intra_op_threads", "1"))
        pad = [p for p in _param(config, "pad_axis1", "").split(",") if p]
        self.input_names = [i["name"] for i in config["input"]]
        buckets = _param(config, "length_buckets", "") or None
        cost = float(_param(config, "call_cost_tokens", "16"))
        self.runner = BatchedOnnxRunner(make_session(version_dir / "model.onnx", threads), pad, buckets, cost)

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
