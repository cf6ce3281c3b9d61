"""Triton python-backend model `flux_prepare`: prompt embeddings, seeded noise and schedule.

The torch/diffusers/transformers half of FluxPipeline (serving.flux_loop.FluxPrep), split off
from `generate` so that the model a LoRA swap reloads starts without those imports. It embeds
the prompt by calling CLIP and T5 over BLS at the versions the calling `generate` pins, through
an LRU of embeddings keyed by prompt and encoder version (serving.prompt_cache): a repeated
prompt skips both encoders. Lookups are counted in Triton's metrics (`PROMPT_CACHE_METRIC`,
label `result`: hit | miss) and each response says whether it hit.

The version folder holds the checkpoint's configs and tokenizers (`pipeline/`), no weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from contract.codec import flux_component_feeds, read_params
from contract.specs import (
    FLUX_IO_NAMES,
    FLUX_PREPARE,
    FLUX_TEXT_ENCODER,
    FLUX_TEXT_ENCODER_2,
    PROMPT_CACHE_MB_PARAMETER,
    PROMPT_CACHE_METRIC,
)
from serving.flux_loop import PREPARED_FIELDS, FluxPrep


class EncoderError(RuntimeError):
    pass


def _encoder(model: str, version: int):
    output_name = FLUX_IO_NAMES[model][1][0]

    def call(*args: np.ndarray) -> np.ndarray:
        response = pb_utils.InferenceRequest(
            model_name=model,
            model_version=version,
            requested_output_names=[output_name],
            inputs=[pb_utils.Tensor(n, a) for n, a in flux_component_feeds(model, args, {}).items()],
        ).exec()
        if response.has_error():
            raise EncoderError(f"{model}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, output_name).as_numpy()

    return call


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        mb = config.get("parameters", {}).get(PROMPT_CACHE_MB_PARAMETER, {}).get("string_value", "256")
        self.prep = FluxPrep(
            Path(args["model_repository"]) / args["model_version"] / "pipeline", prompt_cache_bytes=int(mb) << 20
        )
        self.family = pb_utils.MetricFamily(
            name=PROMPT_CACHE_METRIC,
            description="flux_prepare prompt-embedding cache lookups (a hit skips CLIP and T5)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.counters = {r: self.family.Metric(labels={"result": r}) for r in ("hit", "miss")}

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:

            def get(name: str) -> np.ndarray:
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)

            try:
                req = read_params(get, FLUX_PREPARE)  # guidance is not part of the preparation
                clip_v, t5_v = int(get("clip_version")[0]), int(get("t5_version")[0])
                p = self.prep(
                    req, _encoder(FLUX_TEXT_ENCODER, clip_v), _encoder(FLUX_TEXT_ENCODER_2, t5_v), (clip_v, t5_v)
                )
            except Exception as e:  # a bad request fails alone, never the instance
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"flux_prepare: {e}")))
                continue
            self.counters["hit" if bool(p.prompt_cache_hit[0]) else "miss"].increment(1)
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(getattr(p, name))) for name in PREPARED_FIELDS]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses

    def finalize(self) -> None:
        self.counters.clear()  # metrics go before their family (the backend insists)
        del self.family


assert tuple(t.name for t in FLUX_PREPARE.outputs) == PREPARED_FIELDS, "contract and Prepared disagree"
