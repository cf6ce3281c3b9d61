"""Request and response bodies. Bounds come from client.contract, never retyped here."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from client.contract import CLASSIFY_LIMITS, LABELS


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value


Text = Annotated[str, Field(min_length=1, max_length=CLASSIFY_LIMITS.max_text_chars), AfterValidator(_not_blank)]


class ClassifyRequest(BaseModel):
    """Exactly one of `text` (one message) or `texts` (a batch)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "can I see you in the kitchen?"}, {"texts": ["selfie?", "see you tomorrow"]}]})

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
    uncertain: bool = Field(description="score below the recommended threshold: decide with `scores`, do not trust `label` blindly")


class ClassifyBatchResponse(BaseModel):
    results: list[ClassifyResult]


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
