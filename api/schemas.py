"""Request and response bodies. Bounds come from contract.specs, never retyped here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from contract.specs import (
    CLASSIFY_LIMITS,
    GENERATE_DEFAULTS,
    GENERATE_LIMITS,
    LABELS,
    GenerateParams,
    ImageOptions,
    OutputFormat,
    Prompt,
)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value


Text = Annotated[str, Field(min_length=1, max_length=CLASSIFY_LIMITS.max_text_chars), AfterValidator(_not_blank)]


class ClassifyRequest(BaseModel):
    """Exactly one of `text` (one message) or `texts` (a batch)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"text": "can I see you in the kitchen?"}, {"texts": ["selfie?", "see you tomorrow"]}]
        },
    )

    text: Text | None = None
    texts: Annotated[list[Text], Field(min_length=1, max_length=CLASSIFY_LIMITS.max_texts_per_request)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        return self


class ClassifyResult(BaseModel):
    label: str = Field(description=f"one of {list(LABELS)}")
    score: float = Field(description="probability of `label`")
    scores: dict[str, float]
    uncertain: bool = Field(
        description="score below the recommended threshold: decide with `scores`, do not trust `label` blindly"
    )


class ClassifyBatchResponse(BaseModel):
    results: list[ClassifyResult]


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class GenerateOptions(ImageOptions):
    """/generate's options without the prompt: the contract's ImageOptions (every input of the
    `generate` model but the prompt) plus how many images and in which format. /chat's `generate`
    takes exactly this model, so the two can never validate differently."""

    num_images: Annotated[int, Field(ge=1, le=GENERATE_LIMITS.max_num_images)] = GENERATE_DEFAULTS.num_images
    output_format: OutputFormat = "png"

    @model_validator(mode="after")
    def _seeds_fit(self) -> GenerateOptions:
        # Image i uses seed + i, which must still fit the INT64 seed tensor.
        if self.seed is not None and self.seed + self.num_images - 1 > GENERATE_LIMITS.max_seed:
            raise ValueError(f"seed + num_images - 1 must be at most {GENERATE_LIMITS.max_seed}")
        return self

    def image_params(self, prompt: str, seed: int) -> list[GenerateParams]:
        """Each image's GenerateParams (seeds seed, seed + 1, ...), passed whole to Triton. Checked
        again: the prompt may have grown (trigger words) past the contract's limit."""
        options = self.model_dump(include=set(ImageOptions.model_fields))
        return [GenerateParams.build(**{**options, "prompt": prompt, "seed": seed + i}) for i in range(self.num_images)]


class GenerateRequest(GenerateOptions):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "a portrait in a cafe", "width": 1024, "height": 1024, "seed": 42}]},
    )

    prompt: Prompt


class AppliedLora(BaseModel):
    """The adapter that made an answer's images."""

    name: str
    sha256: str = Field(description="of the adapter's LoRA file: which published adapter it was")
    scale: float = Field(description="the lora_scale applied (the request's, else the adapter's default)")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64-encoded images, one per num_images (seeds seed, seed+1, ...)")
    seed: int
    model_version: str
    prompt: str = Field(description="the prompt as sent to the model (trigger words added when configured)")
    output_format: str
    timings: dict[str, float]
    lora: AppliedLora | None = Field(default=None, description="the adapter the request named; null: none")


class LoraInfo(BaseModel):
    """A published adapter as GET /loras shows it (common.adapter_store.AdapterRecord, less what
    only the server needs: where it came from, the base model's fingerprint)."""

    name: str
    trigger_words: str = Field(description="added to a prompt that names this adapter and lacks them")
    rank: int
    scale: float = Field(description="the default lora_scale")
    owner: str | None = Field(description="the operator key's name that published it")
    created: str = Field(description="ISO 8601, UTC")
    sha256: str = Field(description="of the adapter's LoRA file")
    tensor_bytes: int = Field(description="float32 bytes of its factors: about what a loaded adapter costs")


class LoraList(BaseModel):
    loras: list[LoraInfo] = Field(description="oldest first")


ChatKind = Literal["image", "conversation", "uncertain"]


class ChatRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"message": "make an image of you in Paris", "generate": {"width": 512, "height": 512, "steps": 8}}
            ]
        },
    )

    message: Text
    generate: GenerateOptions | None = Field(
        default=None, description="/generate's options (the prompt comes from the message), with the same checks"
    )


class ChatResponse(BaseModel):
    kind: ChatKind = Field(
        description="image: generated from the message; conversation: not an image request; uncertain: the classifier is not sure, nothing generated"
    )
    classification: ClassifyResult
    image: GenerateResponse | None = Field(description="the /generate answer when kind is image, else null")
