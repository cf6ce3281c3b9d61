"""Triton python-backend model for a FLUX component on the gpu-torch target: PyTorch on the device
its config names (serving/torch_components.py), with Triton's dynamic batcher merging concurrent
generations' calls into one forward pass (serving/onnx_runner.py's merging, unchanged).

Config parameters: those of common.torch_runtime.TorchRuntime (`torch_device`, `torch_dtype`,
`torch_compile_mode`, `torch_compile_backend`, `torch_fp8`, `torch_fuse_qkv`). Request parameter of
`flux_transformer`: contract.specs.FUSED_LORA_PARAMETER, the LoRA the call runs with, patched into
the loaded weights in place when it is not the applied one (serving/torch_lora.py).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from common.torch_runtime import TorchRuntime
from contract.specs import FUSED_LORA_PARAMETER
from serving.adapter_runner import run_checked
from serving.onnx_runner import BatchedOnnxRunner, config_parameters
from serving.torch_adapters import adapter_runner
from serving.torch_components import TorchComponent
from serving.torch_lora import run_without_lora

log = logging.getLogger(__name__)


def _fused_lora(request) -> object:
    """The request's FUSED_LORA_PARAMETER (None when absent; its value is checked where it is used)."""
    raw = request.parameters() if hasattr(request, "parameters") else ""
    try:
        params = json.loads(raw or "{}")
    except ValueError:
        return None
    return params.get(FUSED_LORA_PARAMETER) if isinstance(params, dict) else None


def _response(out: dict | Exception):
    if isinstance(out, ValueError):  # a LoRA or an adapter the request names that this model cannot use
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(out), pb_utils.TritonError.INVALID_ARG))
    if isinstance(out, Exception):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"torch failed: {out}"))
    return pb_utils.InferenceResponse([pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in out.items()])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = config_parameters(config)
        runtime = TorchRuntime.from_parameters(parameters)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.input_names = [i["name"] for i in config["input"]]
        self.component = TorchComponent.load(config["name"], version_dir, runtime)
        self.adapters = adapter_runner(self.component, version_dir, parameters)
        # The session face: the component's own, or the adapter runner's over it.
        self.runner = BatchedOnnxRunner(self.adapters or self.component)  # type: ignore[arg-type]
        # A request naming an adapter this model cannot use fails alone, before merging.
        self.run = (
            self.runner.run
            if self.adapters is None
            else partial(run_checked, self.runner.run, self.adapters.check_request)
        )

    def execute(self, requests: list) -> list:
        feeds = []
        for r in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(r, name) for name in self.input_names}
            feeds.append({name: t.as_numpy() for name, t in tensors.items() if t is not None})  # optional ones absent
        sources = [_fused_lora(r) for r in requests]
        # Each group of requests that names one LoRA runs as one batch under it; a bad group or a
        # bad LoRA fails its own requests, never the model instance.
        if self.component.lora is not None:
            outputs = self.component.lora.run(self.run, feeds, sources)
        else:
            outputs = run_without_lora(self.run, feeds, sources, self.component.name)
        return [_response(out) for out in outputs]

    def finalize(self) -> None:
        import torch

        del self.run, self.runner, self.adapters, self.component
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next version loads beside this process's cached blocks otherwise
