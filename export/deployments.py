"""The one deployment spec per Triton model: instances, batching, runtime parameters.

Knobs come from ExportSettings (env prefix FLUXSERVE_EXPORT_); the classifier's dynamic batching,
instance counts and ORT threads default to the recommendation measured by `fluxserve-bench sweep`
(data/recommended_batching.json, common.paths.RECOMMENDED_BATCHING_FILE) when that file exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.paths import RECOMMENDED_BATCHING_FILE
from contract.specs import (
    CLASSIFIER_ONNX,
    CLASSIFY,
    FLUX_COMPONENTS,
    FLUX_PREPARE,
    FLUX_SCALAR_INPUTS,
    FLUX_TRANSFORMER,
    GENERATE,
    GENERATE_STREAM,
    INLINE_ENCODER_PARAMETER,
    PROMPT_CACHE_MB_PARAMETER,
)
from export.triton_config import Deployment, DynamicBatching, Target

INLINE_ENCODER_FILE = "encoder.onnx"
RESCUE_ENCODER_FILE = "encoder_fp32.onnx"
"""Beside an int8 `encoder.onnx`: the fp32 graph for rows near the boundary (common/int8_rescue.py)."""
"""The encoder graph's name in a `classify` version folder when `classify` runs it itself."""


class ExportSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_EXPORT_")

    classifier_precision: Literal["auto", "fp32", "int8"] = "auto"
    """CPU classifier graph: `auto` serves int8 when its test accuracy is within 0.5 points of
    fp32 (scored at export, recorded in the manifest); `fp32` / `int8` force one."""
    classify_encoder: Literal["inline", "bls"] = "inline"
    """CPU target: `inline` runs the encoder inside `classify`'s own processes (its version folder
    gets a copy of the served graph); `bls` calls `classifier_onnx` per merged batch, as the GPU
    target always does. Inline saves a Triton request, two shared-memory hand-offs and a second
    process's wake-up per merged batch (docs/decisions/classify-encoder-inline.md)."""
    classify_instances: int | None = None
    """None: the sweep's recommendation, else 2."""
    classify_max_queue_size: int = 64
    """classify requests (each up to 64 texts) waiting in Triton beyond which it rejects (503)."""
    classify_max_queue_delay_us: int | None = None
    classify_preferred_batch_sizes: tuple[int, ...] | None = None
    classifier_onnx_instances: int | None = None
    """None: the sweep's recommendation, else 1."""
    classifier_onnx_threads: int | None = None
    """ORT intra-op threads per encoder session (classifier_onnx's, and classify's when inline).
    None: the sweep's recommendation, else 2."""
    classifier_int8_rescue_margin: float = 6.0
    """CPU, int8 served: rows whose int8 logit margin is below this are re-encoded in fp32 by
    `classify` (common/int8_rescue.py). The default sits above the largest margin shift int8
    showed on the validation split (docs/decisions/int8-classifier-rescue.md). 0 serves plain int8."""
    classifier_onnx_max_queue_delay_us: int = 500
    classifier_onnx_call_cost_tokens: float = 12.0
    """One more ORT call's fixed cost in padded tokens' worth of encoder work: the exchange rate the
    classifier_onnx runner uses to split a merged batch by text length (0 would split every length).
    The default is the int8 MiniLM's fixed call cost over its per-token cost (docs/benchmarks.md,
    "Where a /classify request's CPU goes")."""
    generate_instances: int = 4
    """Concurrent generations in Triton; their per-step transformer calls are batched together."""
    generate_max_queue_size: int = 8
    """Generations waiting for an instance beyond which Triton rejects (503). The facade sheds
    load before this by its own cost estimate; this bounds direct gRPC clients too."""
    generate_stream_instances: int = 2
    """Concurrent streamed generations (`generate_stream`, progress per step); they share the
    transformer's batches with `generate`."""
    flux_prepare_instances: int = 1
    """Embed (cached) + noise + schedule, once per generation (milliseconds): one instance keeps
    up, and one instance means one prompt cache."""
    prompt_cache_mb: int = 256
    """Prompt embeddings flux_prepare keeps (LRU); one FLUX.1-dev T5-XXL embedding is 8 MB."""
    flux_transformer_instances: int = 2
    flux_transformer_threads: int = 1
    """Two instances of one ORT thread each, not one of two: a step's small GEMMs (batch 1-2 of
    256 image tokens on the small model) scale poorly over threads, and two instances keep both
    cores on whole batches (docs/decisions/flux-transformer-instances.md). Each instance holds its
    own copy of the weights (FLUX.1-dev int8: ~12 GB): set 1 instance and 2 threads where memory is
    short."""
    flux_transformer_max_queue_delay_us: int = 2000
    """How long a step waits for others to join its batch. Concurrent loops' steps queue behind
    the running forward pass anyway and merge there; a long wait only taxes a lone request every
    step (docs/decisions/flux-transformer-instances.md)."""
    flux_adapter_slots: int = Field(8, ge=2, le=4096)
    """Adapter bank slots per transformer instance, slot 0 (no adapter) included (CPU target, with
    the adapter branch): adapters loaded at once; more distinct ones in a batch wait their turn."""
    flux_component_threads: int = 1
    batching_recommendation: Path = RECOMMENDED_BATCHING_FILE
    """Written by `fluxserve-bench sweep`; the classifier knobs above override it."""


def _recommended(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {}


def _pick(explicit: int | None, recommended: dict, key: str, default: int) -> int:
    return explicit if explicit is not None else int(recommended.get(key, default))


def classifier_deployments(settings: ExportSettings | None = None, target: Target = "cpu") -> dict[str, Deployment]:
    """`classify` and `classifier_onnx`; on the CPU target with `classify_encoder=inline`,
    `classify` carries the encoder's runner parameters and the name of its graph file."""
    s = settings or ExportSettings()
    recommendation = _recommended(s.batching_recommendation)
    rec, rec_onnx = recommendation.get("classify", {}), recommendation.get("classifier_onnx", {})
    delay = (
        s.classify_max_queue_delay_us
        if s.classify_max_queue_delay_us is not None
        else rec.get("max_queue_delay_us", 2000)
    )
    preferred = s.classify_preferred_batch_sizes or tuple(rec.get("preferred_batch_sizes", ()))
    encoder = {
        "intra_op_threads": str(_pick(s.classifier_onnx_threads, rec_onnx, "intra_op_threads", 2)),
        "pad_axis1": "input_ids,attention_mask",
        # Merged chat batches carry much padding: regroup rows by real length (onnx_runner.py).
        "length_buckets": "attention_mask",
        "call_cost_tokens": str(s.classifier_onnx_call_cost_tokens),
    }
    inline = target == "cpu" and s.classify_encoder == "inline"
    return {
        CLASSIFY.name: Deployment(
            spec=CLASSIFY,
            kind="python",
            instance_count=_pick(s.classify_instances, rec, "instances", 2),
            dynamic_batching=DynamicBatching(preferred, delay),
            max_queue_size=s.classify_max_queue_size,
            parameters={**encoder, INLINE_ENCODER_PARAMETER: INLINE_ENCODER_FILE} if inline else {},
        ),
        CLASSIFIER_ONNX.name: Deployment(
            spec=CLASSIFIER_ONNX,
            kind="onnx",
            instance_count=_pick(s.classifier_onnx_instances, rec_onnx, "instances", 1),
            dynamic_batching=DynamicBatching((), s.classifier_onnx_max_queue_delay_us),
            parameters=encoder,
        ),
    }


def flux_deployments(settings: ExportSettings | None = None) -> dict[str, Deployment]:
    """`generate` and `generate_stream` (python BLS), `flux_prepare` and the four FLUX components they call."""
    s = settings or ExportSettings()
    deps = {
        GENERATE.name: Deployment(
            spec=GENERATE, kind="python", instance_count=s.generate_instances, max_queue_size=s.generate_max_queue_size
        ),
        GENERATE_STREAM.name: Deployment(
            spec=GENERATE_STREAM,
            kind="python",
            instance_count=s.generate_stream_instances,
            max_queue_size=s.generate_max_queue_size,
        ),
        FLUX_PREPARE.name: Deployment(
            spec=FLUX_PREPARE,
            kind="python",
            instance_count=s.flux_prepare_instances,
            parameters={PROMPT_CACHE_MB_PARAMETER: str(s.prompt_cache_mb)},
        ),
    }
    for name, spec in FLUX_COMPONENTS.items():
        is_transformer = name == FLUX_TRANSFORMER
        deps[name] = Deployment(
            spec=spec,
            kind="onnx",
            instance_count=s.flux_transformer_instances if is_transformer else 1,
            dynamic_batching=DynamicBatching((), s.flux_transformer_max_queue_delay_us if is_transformer else 1000),
            parameters={
                "intra_op_threads": str(s.flux_transformer_threads if is_transformer else s.flux_component_threads)
            },
            flatten_inputs=tuple(t.name for t in spec.inputs if t.name in FLUX_SCALAR_INPUTS),
            # A request that began before a hot swap pins the component version it started with.
            versions_live=2,
        )
    return deps


def all_deployments(settings: ExportSettings | None = None, target: Target = "cpu") -> dict[str, Deployment]:
    return {**classifier_deployments(settings, target), **flux_deployments(settings)}
