"""Encoding requests to and decoding responses from Triton tensors, shared by both clients.

Inputs are checked against contract.specs before anything is sent, so a bad request fails
fast with InvalidInputError and never costs a network round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import triton_to_np_dtype

from contract.errors import InvalidInputError
from contract.specs import (
    ADAPTER_OUTPUT,
    ADAPTER_SHA256_OUTPUT,
    CLASSIFY,
    CLASSIFY_LIMITS,
    FLUX_ADAPTER_INPUT,
    FLUX_ADAPTER_SCALE_INPUT,
    FLUX_IO_NAMES,
    FLUX_SCALAR_INPUTS,
    FLUX_TRANSFORMER,
    GENERATE,
    GENERATE_STREAM,
    LABELS,
    GenerateParams,
    ModelSpec,
    TensorSpec,
)


@dataclass(frozen=True)
class ClassifyResult:
    label: str
    score: float
    scores: dict[str, float]
    model_version: str = ""
    """The `classify` version that answered (its threshold is the one to apply)."""


@dataclass(frozen=True)
class GenerateResult:
    image: np.ndarray  # uint8 (H, W, 3)
    seed: int
    model_version: str
    lora: str | None = None
    """The adapter that made the image (issue 27); None: the default model."""
    lora_sha256: str | None = None
    """The sha256 of that adapter's LoRA file."""


@dataclass(frozen=True)
class GenerateProgress:
    """One denoising step done: `step` of `total`, `elapsed_s` since the request started."""

    step: int
    total: int
    elapsed_s: float


def check_texts(texts: list[str]) -> None:
    if not isinstance(texts, list | tuple) or not texts:
        raise InvalidInputError("texts must be a non-empty list of strings")
    if len(texts) > CLASSIFY_LIMITS.max_texts_per_request:
        raise InvalidInputError(f"at most {CLASSIFY_LIMITS.max_texts_per_request} texts per request, got {len(texts)}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInputError(f"texts[{i}] must be a string")
        if not t.strip():
            raise InvalidInputError(f"texts[{i}] must not be empty")
        if len(t) > CLASSIFY_LIMITS.max_text_chars:
            raise InvalidInputError(f"texts[{i}] is longer than {CLASSIFY_LIMITS.max_text_chars} characters")


def classify_inputs(texts: list[str]) -> tuple[list[grpcclient.InferInput], list[grpcclient.InferRequestedOutput]]:
    check_texts(texts)
    spec = CLASSIFY.inputs[0]
    data = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
    inp = grpcclient.InferInput(spec.name, list(data.shape), spec.wire_dtype)
    inp.set_data_from_numpy(data)
    return [inp], [grpcclient.InferRequestedOutput(t.name) for t in CLASSIFY.outputs]


def decode_classify(result: grpcclient.InferResult) -> list[ClassifyResult]:
    labels = result.as_numpy(CLASSIFY.outputs[0].name).reshape(-1)
    scores = result.as_numpy(CLASSIFY.outputs[1].name)
    version = result.get_response().model_version
    out = []
    for lab, row in zip(labels, scores):
        label = lab.decode() if isinstance(lab, bytes) else str(lab)
        probs = {name: float(p) for name, p in zip(LABELS, row)}
        out.append(ClassifyResult(label=label, score=probs[label], scores=probs, model_version=version))
    return out


def scalar_array(value: Any, spec: TensorSpec) -> np.ndarray:
    """One request value as the [1] tensor `spec` describes (strings as UTF-8 bytes)."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    return np.array([value], dtype=triton_to_np_dtype(spec.wire_dtype))


def params_arrays(params: GenerateParams, model: ModelSpec = GENERATE) -> dict[str, np.ndarray]:
    """`params` as `model`'s input arrays, one per field that has a value (an absent optional input
    takes the model's default). Generic: a new GenerateParams field needs no change here."""
    values = params.model_dump()
    return {t.name: scalar_array(values[t.name], t) for t in model.inputs if values.get(t.name) is not None}


def read_params(get: Callable[[str], np.ndarray | None], model: ModelSpec = GENERATE) -> GenerateParams:
    """The inverse, inside Triton: a request's tensors (`get(name)` -> array or None) as checked
    GenerateParams; InvalidInputError (a ValueError) names what is wrong. An absent seed is 0."""
    values: dict[str, Any] = {}
    for t in model.inputs:
        if t.name not in GenerateParams.model_fields:  # e.g. flux_prepare's encoder versions
            continue
        array = get(t.name)
        if array is None or array.size == 0:
            continue
        item = array.reshape(-1)[0]
        values[t.name] = item.decode("utf-8") if isinstance(item, bytes) else item.item()
    return GenerateParams.build(**{"seed": 0, "prompt": "", **values})


def generate_inputs(
    params: GenerateParams, model: ModelSpec = GENERATE
) -> tuple[list[grpcclient.InferInput], list[grpcclient.InferRequestedOutput]]:
    """`params` (checked again, so nothing unchecked reaches the wire) as `model`'s gRPC inputs."""
    inputs = []
    for name, array in params_arrays(params.checked(), model).items():
        inp = grpcclient.InferInput(name, list(array.shape), model.input(name).wire_dtype)
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs, [grpcclient.InferRequestedOutput(name) for name in requested_outputs(params, model)]


def requested_outputs(params: GenerateParams, model: ModelSpec = GENERATE) -> list[str]:
    """The outputs to ask for: the optional ones (which adapter made the image) only when the
    request names an adapter, so a plain request also works on a `generate` built before them."""
    return [t.name for t in model.outputs if not t.optional or params.lora is not None]


def _text_output(result: grpcclient.InferResult, name: str) -> str | None:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return None
    item = array.reshape(-1)[0]
    text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
    return text or None


def _generate_result(result: grpcclient.InferResult, image: np.ndarray, seed: int) -> GenerateResult:
    return GenerateResult(
        image=image,
        seed=seed,
        model_version=result.get_response().model_version,
        lora=_text_output(result, ADAPTER_OUTPUT),
        lora_sha256=_text_output(result, ADAPTER_SHA256_OUTPUT),
    )


def decode_generate(result: grpcclient.InferResult, seed: int) -> GenerateResult:
    return _generate_result(result, result.as_numpy(GENERATE.outputs[0].name), seed)


def decode_generate_stream(result: grpcclient.InferResult, seed: int) -> tuple[GenerateProgress, GenerateResult | None]:
    """One `generate_stream` response: its progress, and the image when it is the last one."""
    step, total, elapsed, image = (spec.name for spec in GENERATE_STREAM.outputs[:4])
    progress = GenerateProgress(
        step=int(result.as_numpy(step).reshape(-1)[0]),
        total=int(result.as_numpy(total).reshape(-1)[0]),
        elapsed_s=float(result.as_numpy(elapsed).reshape(-1)[0]),
    )
    pixels = result.as_numpy(image)
    if pixels is None:
        return progress, None
    return progress, _generate_result(result, pixels, seed)


def flux_component_feeds(
    model: str, args: Sequence[np.ndarray], kwargs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """A FLUX component call's arrays by input name (positional in contract order, or by name),
    shaped for Triton's wire: per-item scalars are [B] to the graph but [B, 1] on the wire."""
    input_names = FLUX_IO_NAMES[model][0]
    if model == FLUX_TRANSFORMER:  # the adapter branch's inputs, when the caller sends them
        input_names = (*input_names, *(n for n in (FLUX_ADAPTER_INPUT, FLUX_ADAPTER_SCALE_INPUT) if n in kwargs))
    feeds = dict(zip(input_names, args)) | dict(kwargs)
    return {
        name: np.ascontiguousarray(feeds[name].reshape(-1, 1) if name in FLUX_SCALAR_INPUTS else feeds[name])
        for name in input_names
    }
