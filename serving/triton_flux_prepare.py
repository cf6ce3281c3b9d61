"""Triton python-backend model `flux_prepare`: tokens, seeded noise and schedule of a request.

The torch/diffusers/transformers half of FluxPipeline (serving.flux_loop.FluxPrep), split off
from `generate` so that the model a LoRA swap reloads starts without those imports. The version
folder holds the checkpoint's configs and tokenizers (`pipeline/`), no weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from client.contract import FLUX_PREPARE
from serving.flux_loop import PREPARED_FIELDS, FluxPrep, GenerationRequest


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.prep = FluxPrep(Path(args["model_repository"]) / args["model_version"] / "pipeline")

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:

            def get(name: str) -> np.ndarray:
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)

            try:
                raw = get("prompt")[0]
                req = GenerationRequest(
                    prompt=raw.decode("utf-8") if isinstance(raw, bytes) else str(raw),
                    width=int(get("width")[0]),
                    height=int(get("height")[0]),
                    steps=int(get("steps")[0]),
                    guidance=0.0,  # not part of the preparation
                    seed=int(get("seed")[0]),
                )
                p = self.prep(req)
            except Exception as e:  # a bad request fails alone, never the instance
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"flux_prepare: {e}")))
                continue
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(getattr(p, name))) for name in PREPARED_FIELDS]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses


assert tuple(t.name for t in FLUX_PREPARE.outputs) == PREPARED_FIELDS, "contract and Prepared disagree"
