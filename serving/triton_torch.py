"""Triton python-backend model for a FLUX component on the gpu-torch target: PyTorch on the device
its config names (serving/torch_components.py), with Triton's dynamic batcher merging concurrent
generations' calls into one forward pass (serving/onnx_runner.py's merging, unchanged).

Config parameters: those of common.torch_runtime.TorchRuntime (`torch_device`, `torch_dtype`,
`torch_compile_mode`, `torch_compile_backend`, `torch_fp8`, `torch_fuse_qkv`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from common.torch_runtime import TorchRuntime
from serving.onnx_runner import BatchedOnnxRunner, config_parameters
from serving.torch_components import TorchComponent

log = logging.getLogger(__name__)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        runtime = TorchRuntime.from_parameters(config_parameters(config))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.input_names = [i["name"] for i in config["input"]]
        self.component = TorchComponent.load(config["name"], version_dir, runtime)
        self.runner = BatchedOnnxRunner(self.component)  # type: ignore[arg-type]  (the session face)

    def execute(self, requests: list) -> list:
        feeds = [
            {name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names} for r in requests
        ]
        try:
            outputs = self.runner.run(feeds)
        except Exception as e:  # a bad batch fails its requests, never the model instance
            log.exception("%s failed", self.component.name)
            err = pb_utils.TritonError(f"torch failed: {e}")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in out.items()])
            for out in outputs
        ]

    def finalize(self) -> None:
        import torch

        del self.runner, self.component
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next version loads beside this process's cached blocks otherwise
