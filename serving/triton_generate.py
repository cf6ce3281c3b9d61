"""Triton python-backend model `generate`: tokenize, encode, denoise, decode, over BLS.

Each instance runs one request's flow-matching loop (serving/flux_loop.py, diffusers' scheduler).
Every component call is a BLS request to its own Triton model; because several `generate`
instances run at once, their per-step `flux_transformer` calls meet in that model's dynamic
batcher and share forward passes (step-level batching).

The version folder holds the pipeline's configs and tokenizers (no weights) and
`components.json`: the component model versions this version was exported with. Calls pin those
versions, so a request that started before a hot swap finishes on the weights it started with.
On the gpu-torch target it also holds the transformer LoRA's factors (FUSED_LORA_FILE), and the
transformer calls name it (FUSED_LORA_PARAMETER): a LoRA swap keeps the transformer's version,
which patches itself in place per call, so the same holds there.

A LoRA swap loads a new version of this model, so it imports numpy and the contract only (with torch
and diffusers each instance was slow to start: docs/decisions/numpy-only-generate.md): the tokenizers,
the seeded noise and the schedule come from the `flux_prepare` model over BLS, which a LoRA swap
leaves loaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from contract.codec import flux_component_feeds, params_arrays, read_params
from contract.cost import TransformerShape, instance_memory_budget, memory_guard_message, transformer_peak_bytes
from contract.specs import (
    ATTENTION_HEADS_PARAMETER,
    FLUX_IO_NAMES,
    FLUX_PREPARE,
    FLUX_TEXT_ENCODER,
    FLUX_TEXT_ENCODER_2,
    FLUX_TRANSFORMER,
    FLUX_VAE_DECODER,
    FUSED_LORA_FILE,
    FUSED_LORA_PARAMETER,
    GENERATE,
    HOST_MEMORY_SHARE_PARAMETER,
    TEXT_TOKENS_PARAMETER,
    GenerateParams,
)
from serving.adapter_choice import AdapterResolver
from serving.flux_loop import PREPARED_FIELDS, FluxLoop, Prepared
from serving.stop_check import Stopped, stop_check

log = logging.getLogger(__name__)


class ComponentError(RuntimeError):
    pass


def _stop_check(request):
    """Cancellation and deadline of a received request (python backend API, Triton >= 23.10)."""
    is_cancelled = getattr(request, "is_cancelled", None) or (lambda: False)
    timeout = getattr(request, "timeout", None)
    return stop_check(is_cancelled, int(timeout() or 0) if timeout else 0)


def _memory_guard(model_config: dict):
    """A check refusing (ValueError) a request whose transformer activations would pass this
    instance's part of the host's memory: the same estimate as the facade's guard (contract.cost),
    here for the gRPC clients that do not go through the facade. Every instance may hold its part
    at once, so together they stay within the model's share whatever arrives."""
    parameters = model_config.get("parameters", {})
    instances = max(1, sum(int(g.get("count", 1)) for g in model_config.get("instance_group", [])))

    def number(key: str) -> float:
        return float(parameters.get(key, {}).get("string_value") or 0)

    default = TransformerShape()
    shape = TransformerShape(
        int(number(ATTENTION_HEADS_PARAMETER) or default.attention_heads),
        int(number(TEXT_TOKENS_PARAMETER) or default.text_tokens),
    )
    budget = instance_memory_budget(number(HOST_MEMORY_SHARE_PARAMETER), instances)

    def check(req: GenerateParams) -> None:
        needed = transformer_peak_bytes(req.width, req.height, 1, shape)
        if budget is not None and needed > budget:
            raise ValueError(memory_guard_message(needed, budget))

    return check


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        components = json.loads((version_dir / "components.json").read_text())
        # gpu-torch: this version's transformer LoRA, which every transformer call names, so the
        # running transformer patches itself to it (serving/torch_lora.py) and no call of this
        # version ever runs on another version's LoRA.
        lora = {FUSED_LORA_PARAMETER: f"{args['model_name']}/{args['model_version']}"}
        self.loop = FluxLoop(
            version_dir / "pipeline",
            encode_clip=self._caller(FLUX_TEXT_ENCODER, components),
            encode_t5=self._caller(FLUX_TEXT_ENCODER_2, components),
            transformer=self._caller(
                FLUX_TRANSFORMER, components, lora if (version_dir / FUSED_LORA_FILE).exists() else None
            ),
            decode_vae=self._caller(FLUX_VAE_DECODER, components),
            prepare=self._preparer(components),
        )
        self.memory_guard = _memory_guard(json.loads(args["model_config"]))
        # Issue 27: requests naming a published adapter, when the pinned transformer has the branch.
        repository = Path(args["model_repository"]).parent  # args["model_repository"]: this model's folder
        transformer_dir = repository / FLUX_TRANSFORMER / str(components.get(FLUX_TRANSFORMER, -1))
        self.adapters = AdapterResolver(repository, transformer_dir)

    @staticmethod
    def _preparer(components: dict[str, int]):
        version = int(components.get(FLUX_PREPARE.name, -1))
        encoders = (int(components[FLUX_TEXT_ENCODER]), int(components[FLUX_TEXT_ENCODER_2]))

        def prepare(req: GenerateParams) -> Prepared:
            feeds = {
                **params_arrays(req, FLUX_PREPARE),
                "clip_version": np.array([encoders[0]], dtype=np.int64),
                "t5_version": np.array([encoders[1]], dtype=np.int64),
            }
            response = pb_utils.InferenceRequest(
                model_name=FLUX_PREPARE.name,
                model_version=version,
                requested_output_names=list(PREPARED_FIELDS),
                inputs=[pb_utils.Tensor(k, v) for k, v in feeds.items()],
            ).exec()
            if response.has_error():
                raise ComponentError(f"{FLUX_PREPARE.name}: {response.error().message()}")
            return Prepared(**{n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in PREPARED_FIELDS})

        return prepare

    @staticmethod
    def _caller(model: str, components: dict[str, int], parameters: dict[str, str] | None = None):
        output_name = FLUX_IO_NAMES[model][1][0]
        version = int(components.get(model, -1))
        extra = {"parameters": parameters} if parameters else {}

        def call(*args: np.ndarray, **kwargs: np.ndarray) -> np.ndarray:
            request = pb_utils.InferenceRequest(
                model_name=model,
                model_version=version,
                requested_output_names=[output_name],
                inputs=[pb_utils.Tensor(name, arr) for name, arr in flux_component_feeds(model, args, kwargs).items()],
                **extra,
            )
            response = request.exec()
            if response.has_error():
                raise ComponentError(f"{model}: {response.error().message()}")
            return pb_utils.get_output_tensor_by_name(response, output_name).as_numpy()

        return call

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:  # max_batch_size 0: one request per loop, instances run in parallel

            def get(name: str) -> np.ndarray | None:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            try:
                req = read_params(get)
                self.memory_guard(req)
                req, adapter, transformer_extra = self.adapters.resolve(req)
            except ValueError as e:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
                )
                continue
            try:
                check = _stop_check(request)
                check()  # cancelled while it queued: never start
                image = self.loop(req, on_step=check, transformer_extra=transformer_extra)
            except Stopped as e:
                code = getattr(pb_utils.TritonError, "CANCELLED", pb_utils.TritonError.UNAVAILABLE)
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), code)))
                continue
            except ComponentError as e:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"generation failed: {e}", pb_utils.TritonError.UNAVAILABLE)
                    )
                )
                continue
            except Exception as e:  # never crash the instance: fail this request only
                log.exception("generate failed")
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {e}")))
                continue
            tensors = {GENERATE.outputs[0].name: image, **adapter.output_arrays()}
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()]))
        return responses
