"""The public contract of fluxserve: model names, tensor names, dtypes, labels and limits.

This module is the one source of truth for these facts. Triton configs (export/), the facade's
validation (api/), the Python client, the benchmarks and the docs' tables are all derived from
it, so a change here changes every door at once.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from common.adapter_bank import SCALE_INPUT
from common.adapter_store import MAX_SCALE as MAX_ADAPTER_SCALE
from common.adapter_store import InvalidAdapterName, check_name
from contract.errors import InvalidInputError

TritonDType = Literal["TYPE_STRING", "TYPE_FP32", "TYPE_FP16", "TYPE_INT32", "TYPE_INT64", "TYPE_UINT8", "TYPE_BOOL"]

# KServe v2 datatype names as tritonclient spells them, keyed by the config.pbtxt enum name.
WIRE_DTYPE: dict[str, str] = {
    "TYPE_STRING": "BYTES",
    "TYPE_FP32": "FP32",
    "TYPE_FP16": "FP16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_UINT8": "UINT8",
    "TYPE_BOOL": "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a Triton model. `dims` excludes the batch dimension."""

    name: str
    dtype: TritonDType
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def wire_dtype(self) -> str:
        return WIRE_DTYPE[self.dtype]


@dataclass(frozen=True)
class ModelSpec:
    """The public face of a Triton model: what a client sends and receives."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    decoupled: bool = False
    """Answers a request with a stream of responses (Triton's decoupled transaction policy):
    clients must use gRPC streaming, and a response may carry only some of the outputs."""

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


# ----------------------------------------------------------------------------- classification

LABELS: tuple[str, ...] = ("conversation", "image_request")
"""Classifier labels in logit order: index i of `scores` is the probability of LABELS[i]."""

IMAGE_REQUEST = "image_request"
CONVERSATION = "conversation"


@dataclass(frozen=True)
class ClassifyLimits:
    max_texts_per_request: int = 64
    """A /classify batch larger than this is refused (422): it would monopolise the batcher."""
    max_text_chars: int = 2000
    """Longer texts are refused (422). Chat messages are short; this bounds tokenizer work."""
    max_tokens: int = 128
    """Texts are truncated to this many tokens (incl. special tokens) before the encoder."""


CLASSIFY_LIMITS = ClassifyLimits()

CLASSIFY = ModelSpec(
    name="classify",
    inputs=(TensorSpec("text", "TYPE_STRING", (1,)),),
    outputs=(
        TensorSpec("label", "TYPE_STRING", (1,)),
        TensorSpec("scores", "TYPE_FP32", (len(LABELS),)),
    ),
    max_batch_size=CLASSIFY_LIMITS.max_texts_per_request,
)

# The ONNX encoder behind `classify` (called by BLS; not part of the public contract).
CLASSIFIER_ONNX = ModelSpec(
    name="classifier_onnx",
    inputs=(
        TensorSpec("input_ids", "TYPE_INT64", (-1,)),
        TensorSpec("attention_mask", "TYPE_INT64", (-1,)),
    ),
    outputs=(TensorSpec("logits", "TYPE_FP32", (len(LABELS),)),),
    max_batch_size=CLASSIFY_LIMITS.max_texts_per_request,
)


# ----------------------------------------------------------------------------- generation

OutputFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class GenerateLimits:
    min_side: int = 64
    max_side: int = 2048
    side_multiple: int = 16
    """FLUX packs 2x2 latent patches of an 8x-downsampled VAE latent: sides must divide by 16."""
    min_steps: int = 1
    max_steps: int = 100
    min_guidance: float = 0.0
    max_guidance: float = 20.0
    max_num_images: int = 4
    max_prompt_chars: int = 2000
    max_seed: int = 2**63 - 1
    """The `seed` tensor is INT64; image i of a request uses seed + i, so seed + num_images - 1 <= this."""


GENERATE_LIMITS = GenerateLimits()


@dataclass(frozen=True)
class GenerateDefaults:
    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 3.5
    num_images: int = 1
    output_format: str = "png"


GENERATE_DEFAULTS = GenerateDefaults()

ADAPTER_OUTPUT = "adapter"
ADAPTER_SHA256_OUTPUT = "adapter_sha256"

GENERATE = ModelSpec(
    name="generate",
    inputs=(
        TensorSpec("prompt", "TYPE_STRING", (1,)),
        TensorSpec("seed", "TYPE_INT64", (1,), optional=True),
        TensorSpec("steps", "TYPE_INT32", (1,), optional=True),
        TensorSpec("guidance", "TYPE_FP32", (1,), optional=True),
        TensorSpec("width", "TYPE_INT32", (1,), optional=True),
        TensorSpec("height", "TYPE_INT32", (1,), optional=True),
        # Issue 27: a published adapter (LoRA) by name, and its scale; absent = the default model.
        TensorSpec("lora", "TYPE_STRING", (1,), optional=True),
        TensorSpec("lora_scale", "TYPE_FP32", (1,), optional=True),
    ),
    outputs=(
        TensorSpec("image", "TYPE_UINT8", (-1, -1, 3)),
        # Which adapter made the image and the sha256 of its LoRA file ("" without one). Optional:
        # clients ask for them only when a request names an adapter.
        TensorSpec(ADAPTER_OUTPUT, "TYPE_STRING", (1,), optional=True),
        TensorSpec(ADAPTER_SHA256_OUTPUT, "TYPE_STRING", (1,), optional=True),
    ),
    max_batch_size=0,
)

GENERATE_STREAM = ModelSpec(
    name="generate_stream",
    inputs=GENERATE.inputs,
    outputs=(
        # Every response carries the progress; only the last one carries the image.
        TensorSpec("step", "TYPE_INT32", (1,)),
        TensorSpec("total", "TYPE_INT32", (1,)),
        TensorSpec("elapsed_s", "TYPE_FP32", (1,)),
        *GENERATE.outputs,
    ),
    max_batch_size=0,
    decoupled=True,
)
"""`generate` with progress: one response per denoising step (step, total, elapsed_s), then a
final response with the image too. Same inputs, same pipeline, same pinned components; a
cancelled stream stops the loop at its next step."""


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value


def _adapter_name(value: str) -> str:
    try:
        return check_name(value)
    except InvalidAdapterName as e:
        raise ValueError(str(e)) from None


def random_seed() -> int:
    return secrets.randbelow(2**31)


Prompt = Annotated[str, Field(min_length=1, max_length=GENERATE_LIMITS.max_prompt_chars), AfterValidator(_not_blank)]
Side = Annotated[
    int, Field(ge=GENERATE_LIMITS.min_side, le=GENERATE_LIMITS.max_side, multiple_of=GENERATE_LIMITS.side_multiple)
]


class ImageOptions(BaseModel):
    """How one image is generated, apart from its prompt: each field is one optional input tensor of
    `generate` (same name; GENERATE.inputs gives the dtype). A new generation parameter is a field
    here plus its TensorSpec in GENERATE: the codec, the Triton models' request reader, the facade's
    request bodies (api.schemas subclasses this) and the OpenAPI page all follow from it.

    `seed` None means "any": the client draws one before sending, so every answer names its seed."""

    model_config = ConfigDict(extra="forbid")

    seed: Annotated[int, Field(ge=0, le=GENERATE_LIMITS.max_seed)] | None = None
    steps: Annotated[int, Field(ge=GENERATE_LIMITS.min_steps, le=GENERATE_LIMITS.max_steps)] = GENERATE_DEFAULTS.steps
    guidance: Annotated[
        float, Field(ge=GENERATE_LIMITS.min_guidance, le=GENERATE_LIMITS.max_guidance, allow_inf_nan=False)
    ] = GENERATE_DEFAULTS.guidance
    width: Side = GENERATE_DEFAULTS.width
    height: Side = GENERATE_DEFAULTS.height
    lora: Annotated[str, AfterValidator(_adapter_name)] | None = None
    """A published adapter (common.adapter_store) to generate with; None: the default model."""
    lora_scale: Annotated[float, Field(ge=0.0, le=MAX_ADAPTER_SCALE, allow_inf_nan=False)] | None = None
    """The adapter's strength; None: the adapter's own default scale. Ignored without `lora`."""


class GenerateParams(ImageOptions):
    """One image to generate: the `generate` model's inputs, whole. Passed as one object from the
    facade's request body through the clients and the codec to the model's loop.

    `GenerateParams.build(...)` (and `checked`) raise InvalidInputError naming each bad field, so a
    bad request fails before any network call; `GenerateParams(...)` raises pydantic's error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Prompt

    @classmethod
    def build(cls, **values: Any) -> GenerateParams:
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise InvalidInputError(validation_message(e)) from None

    def checked(self) -> GenerateParams:
        """Checked again (an object made with model_construct or copied with an update is not)."""
        return type(self).build(**self.model_dump())

    def seeded(self) -> GenerateParams:
        """With a seed: its own, else a random one."""
        return self if self.seed is not None else self.model_copy(update={"seed": random_seed()})

    def with_seed(self, seed: int) -> GenerateParams:
        return self.model_copy(update={"seed": seed})


def validation_message(e: ValidationError) -> str:
    """pydantic's errors as one line: `field: reason; field: reason`."""
    return "; ".join(
        f"{'.'.join(map(str, err['loc'])) or 'request'}: {str(err['msg']).removeprefix('Value error, ')}"
        for err in e.errors()
    )


if {f for f in GenerateParams.model_fields} != {t.name for t in GENERATE.inputs}:
    raise AssertionError("GenerateParams and the generate model's inputs disagree")  # checked at import: one home

# Transformer input names as NVIDIA's FLUX ONNX export spells them.
DEFAULT_TRIGGER_WORD = "Super Realism"
"""Trigger words of the production LoRA (strangerzonehf/Flux-Super-Realism-LoRA); the local LoRA uses
them too. The facade prepends the deployed LoRA's trigger words, falling back to these."""

# Parameters written into deployed models' config.pbtxt (`parameters`) and read back by the facade.
THRESHOLD_PARAMETER = "recommended_threshold"
"""classify: the uncertainty threshold measured on the validation split when it was published."""
INLINE_ENCODER_PARAMETER = "inline_encoder"
"""classify (CPU target): the file in its version folder holding the encoder graph. When set,
`classify` runs the encoder in its own process instead of calling `classifier_onnx` over BLS."""
RESCUE_ENCODER_PARAMETER = "rescue_encoder"
"""classify (CPU target, int8 encoder): the fp32 graph in its version folder that re-encodes the
rows whose int8 logits lie within `rescue_margin` of the boundary (common/int8_rescue.py)."""
RESCUE_MARGIN_PARAMETER = "rescue_margin"
TRIGGER_PARAMETER = "trigger_word"
"""generate: the trigger words of the LoRA fused into that version."""
ATTENTION_HEADS_PARAMETER = "attention_heads"
"""generate: its transformer's attention heads (the facade's memory guard, contract/cost.py)."""
TEXT_TOKENS_PARAMETER = "text_tokens"
"""generate: T5 tokens per prompt (the facade's memory guard, contract/cost.py)."""
HOST_MEMORY_SHARE_PARAMETER = "host_memory_share"
"""generate, generate_stream: the share of the host's memory that the transformer activations of
this model's concurrent images may use, split evenly over its instances ("0": no guard, the GPU
target, where TensorRT profiles bound it). The model itself refuses a request over its instance's
part of it, so gRPC clients that bypass the facade cannot get a stub OOM-killed either."""

FLUX_TRANSFORMER_INPUTS: tuple[str, ...] = (
    "hidden_states",
    "encoder_hidden_states",
    "pooled_projections",
    "timestep",
    "img_ids",
    "txt_ids",
    "guidance",
)


# ----------------------------------------------------------------------------- training API


@dataclass(frozen=True)
class TrainLimits:
    max_upload_bytes: int = 200 * 1024 * 1024
    """Default largest dataset upload (POST /train body); FLUXSERVE_JOBS_MAX_UPLOAD_BYTES overrides it."""
    max_list_limit: int = 1000
    """GET /train?limit= is 1..this."""
    min_poll_s: float = 0.1
    max_poll_s: float = 10.0
    """GET /train/{id}/events?poll_s= bounds: no busy loop, no stream that never speaks."""


TRAIN_LIMITS = TrainLimits()

JobKind = Literal["flux_lora", "classifier"]
"""What POST /train trains: a FLUX LoRA from a zip of images, or the prompt classifier."""
JOB_KINDS: tuple[JobKind, ...] = get_args(JobKind)
DEFAULT_JOB_KIND: JobKind = "flux_lora"


@dataclass(frozen=True)
class Endpoints:
    """Default addresses. Everything binds loopback; only the facade is meant to be exposed."""

    host: str = "127.0.0.1"
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    api_port: int = 8080
    extra: dict[str, int] = field(default_factory=dict)


ENDPOINTS = Endpoints()


# ----------------------------------------------------------------------------- FLUX components
# Internal models that `generate` calls over BLS. Names are part of the repository layout (and of
# any TensorRT engine built from the ONNX files), so they live here with the public ones.
# Every tensor is batch-major so that Triton's dynamic batcher can merge requests along dim 0;
# requests only merge when their other dims (image size, text length) are equal.

FLUX_TEXT_ENCODER = "flux_text_encoder"  # CLIP: input_ids (B, 77) -> pooled_embeds (B, D)
FLUX_TEXT_ENCODER_2 = "flux_text_encoder_2"  # T5: input_ids (B, L) -> text_embeds (B, L, D)
FLUX_TRANSFORMER = "flux_transformer"  # FLUX_TRANSFORMER_INPUTS -> latent (B, N, C)
FLUX_VAE_DECODER = "flux_vae_decoder"  # latent (B, 16, h, w) -> images (B, 3, H, W) in [-1, 1]

FLUX_IO_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    FLUX_TEXT_ENCODER: (("input_ids",), ("pooled_embeds",)),
    FLUX_TEXT_ENCODER_2: (("input_ids",), ("text_embeds",)),
    FLUX_TRANSFORMER: (FLUX_TRANSFORMER_INPUTS, ("latent",)),
    FLUX_VAE_DECODER: (("latent",), ("images",)),
}

FLUX_PIPELINE_SLOTS: dict[str, str] = {
    FLUX_TEXT_ENCODER: "text_encoder",
    FLUX_TEXT_ENCODER_2: "text_encoder_2",
    FLUX_TRANSFORMER: "transformer",
    FLUX_VAE_DECODER: "vae",
}
"""Each component's folder in a diffusers FLUX checkpoint (its FluxPipeline attribute, its LoRA key prefix)."""

FLUX_MAX_BATCH = 8
"""Largest merged batch a FLUX component accepts (concurrent generations sharing a step)."""

# Dims (excluding batch) per tensor, by rank; -1 is dynamic. Scalars per item travel as [1] and
# are flattened to [B] for the model (see export.triton_config.Deployment.flatten_inputs).
_FLUX_DIMS: dict[str, dict[str, tuple[int, ...]]] = {
    FLUX_TEXT_ENCODER: {"input_ids": (-1,), "pooled_embeds": (-1,)},
    FLUX_TEXT_ENCODER_2: {"input_ids": (-1,), "text_embeds": (-1, -1)},
    FLUX_TRANSFORMER: {
        "hidden_states": (-1, -1),
        "encoder_hidden_states": (-1, -1),
        "pooled_projections": (-1,),
        "timestep": (1,),
        "img_ids": (-1, 3),
        "txt_ids": (-1, 3),
        "guidance": (1,),
        "latent": (-1, -1),
    },
    FLUX_VAE_DECODER: {"latent": (-1, -1, -1), "images": (3, -1, -1)},
}
FLUX_SCALAR_INPUTS: tuple[str, ...] = ("timestep", "guidance")

FUSED_LORA_PARAMETER = "fused_lora"
"""`flux_transformer` request parameter (gpu-torch target): "<pipeline>/<version>", the `generate`
or `generate_stream` version whose FUSED_LORA_FILE the call runs with; absent or "": the base
weights. The running transformer patches its own weights in place to that LoRA before the call
(serving/torch_lora.py), so a LoRA swap reloads no transformer and every call names its LoRA."""
FUSED_LORA_FILE = "transformer_lora.safetensors"
"""In a `generate` / `generate_stream` version (gpu-torch): the transformer LoRA's low-rank factors
(common.torch_runtime.save_lora_factors' layout) that this pipeline version runs with."""
_FUSED_LORA_SOURCE = re.compile(r"^(?P<model>[a-z_]+)/(?P<version>[1-9][0-9]{0,17})$")


def fused_lora_source(value: object) -> tuple[str, int] | None:
    """(pipeline model, version) of a FUSED_LORA_PARAMETER value; None for absent or "". ValueError
    for anything else: the transformer reads only a pipeline version's own LoRA file."""
    if value is None or value == "":
        return None
    m = _FUSED_LORA_SOURCE.match(value) if isinstance(value, str) else None
    if m is None or m["model"] not in (GENERATE.name, GENERATE_STREAM.name):
        raise ValueError(
            f"{FUSED_LORA_PARAMETER} must be '{GENERATE.name}/<version>' or '{GENERATE_STREAM.name}/<version>', "
            f"not {str(value)[:80]!r}"
        )
    return m["model"], int(m["version"])


def _flux_spec(name: str) -> ModelSpec:
    ins, outs = FLUX_IO_NAMES[name]
    dims = _FLUX_DIMS[name]

    def dtype(t: str) -> TritonDType:
        return "TYPE_INT64" if t == "input_ids" else "TYPE_FP32"

    return ModelSpec(
        name=name,
        inputs=tuple(TensorSpec(t, dtype(t), dims[t]) for t in ins),
        outputs=tuple(TensorSpec(t, dtype(t), dims[t]) for t in outs),
        max_batch_size=FLUX_MAX_BATCH,
    )


FLUX_COMPONENTS: dict[str, ModelSpec] = {n: _flux_spec(n) for n in FLUX_IO_NAMES}

FLUX_ADAPTER_INPUT = "adapter"
"""`flux_transformer` with the adapter branch (issue 27): the published adapter each row runs
with, by name ("" = none); the model loads it from the adapter store into a bank slot."""
FLUX_ADAPTER_SCALE_INPUT = SCALE_INPUT
"""... and each row's LoRA scale (the graph's own input of that name)."""
FLUX_ADAPTER_TRANSFORMER = ModelSpec(
    name=FLUX_TRANSFORMER,
    inputs=(
        *FLUX_COMPONENTS[FLUX_TRANSFORMER].inputs,
        TensorSpec(FLUX_ADAPTER_INPUT, "TYPE_STRING", (1,), optional=True),
        TensorSpec(FLUX_ADAPTER_SCALE_INPUT, "TYPE_FP32", (1,), optional=True),
    ),
    outputs=FLUX_COMPONENTS[FLUX_TRANSFORMER].outputs,
    max_batch_size=FLUX_MAX_BATCH,
)
"""The CPU and gpu-torch targets' `flux_transformer` when it serves the adapter branch: the
component's inputs plus the two above (generate sends them on every call, "" and 0 for rows
without an adapter, so all calls batch together)."""
ADAPTER_SLOTS_PARAMETER = "adapter_slots"
"""flux_transformer (adapter branch): bank slots per instance, slot 0 (no adapter) included."""


FLUX_PREPARE = ModelSpec(
    name="flux_prepare",
    inputs=(
        TensorSpec("prompt", "TYPE_STRING", (1,)),
        TensorSpec("width", "TYPE_INT32", (1,)),
        TensorSpec("height", "TYPE_INT32", (1,)),
        TensorSpec("steps", "TYPE_INT32", (1,)),
        TensorSpec("seed", "TYPE_INT64", (1,)),
        # The encoder versions the calling `generate` pins: part of the prompt cache's key.
        TensorSpec("clip_version", "TYPE_INT64", (1,)),
        TensorSpec("t5_version", "TYPE_INT64", (1,)),
    ),
    # Named as serving.flux_loop.Prepared's fields.
    outputs=(
        TensorSpec("pooled_embeds", "TYPE_FP32", (1, -1)),
        TensorSpec("text_embeds", "TYPE_FP32", (1, -1, -1)),
        TensorSpec("latents", "TYPE_FP32", (1, -1, -1)),
        TensorSpec("img_ids", "TYPE_FP32", (1, -1, 3)),
        TensorSpec("timesteps", "TYPE_FP32", (-1,)),
        TensorSpec("sigmas", "TYPE_FP32", (-1,)),
        TensorSpec("prompt_cache_hit", "TYPE_BOOL", (1,)),
    ),
    max_batch_size=0,
)
PROMPT_CACHE_MB_PARAMETER = "prompt_cache_mb"
"""flux_prepare: megabytes of prompt embeddings kept (LRU)."""
PROMPT_CACHE_METRIC = "fluxserve_prompt_cache_lookups_total"
"""flux_prepare's counter on Triton's metrics port, label `result` = hit | miss; the facade's
/metrics repeats it when it knows that port (ApiSettings.triton_metrics_url)."""
"""Internal (BLS from `generate`): a request's prompt embeddings (through a cache), seeded noise
and schedule. It needs torch,
diffusers and the tokenizers, and depends on the base checkpoint only, so a LoRA swap neither
rewrites nor reloads it; `generate`, which a swap does reload, then imports numpy alone."""
