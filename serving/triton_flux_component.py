"""Triton python-backend entry point of the FLUX component models (`flux_text_encoder`,
`flux_text_encoder_2`, `flux_transformer`, `flux_vae_decoder`): the same model names and tensors
on every target; the config's `runtime` parameter picks what computes them.

- absent (cpu target): the version's `model.onnx` on ONNX Runtime (serving/triton_onnx.py);
- "torch" (gpu-torch target): the version's PyTorch module on its device (serving/triton_torch.py).
"""

from __future__ import annotations

import json

from common.torch_runtime import is_torch_component
from serving.onnx_runner import config_parameters


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        if is_torch_component(config_parameters(json.loads(args["model_config"]))):
            from serving.triton_torch import TritonPythonModel as Impl
        else:
            from serving.triton_onnx import TritonPythonModel as Impl  # type: ignore[assignment]
        self.impl = Impl()
        self.impl.initialize(args)

    def execute(self, requests: list) -> list:
        return self.impl.execute(requests)

    def finalize(self) -> None:
        finalize = getattr(self.impl, "finalize", None)
        if finalize is not None:
            finalize()
