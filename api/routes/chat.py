"""POST /chat: one call per chat message. Classify it; if it asks for an image (and the
classifier is sure), generate from it in the same call.

The prompt sent to FLUX is the message with its request phrasing removed (api/prompt_rewrite.py).
With `Accept: text/event-stream` the answer streams: `classification` first, then the
generation's `progress` events and its `image` (api/event_stream.py). A message whose `generate`
options name an unpublished LoRA (`lora`) is refused (404, or an `error` event) before it is
classified, whatever it asks for. An adapter: classification
and generation are the services' (api.services), with their rules, as on /classify and /generate.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse

from api.cancellation import disconnected
from api.event_stream import Event, event, event_response, generation_events, wants_event_stream
from api.media import raw_format
from api.prompt_rewrite import image_prompt
from api.schemas import ChatKind, ChatRequest, ChatResponse, ClassifyResult, ErrorResponse, GenerateRequest
from api.services.classification import ClassificationService, classification_service
from api.services.generation import GenerationService, generation_service
from contract.errors import InvalidInputError
from contract.specs import IMAGE_REQUEST

router = APIRouter(tags=["chat"])
"""Included by api.routes.inference, behind the inference key (it runs both models)."""

ERRORS = {422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}}

Classification = Annotated[ClassificationService, Depends(classification_service)]
Generation = Annotated[GenerationService, Depends(generation_service)]


def chat_kind(result: ClassifyResult) -> ChatKind:
    if result.uncertain:
        return "uncertain"
    return "image" if result.label == IMAGE_REQUEST else "conversation"


def generation_request(body: ChatRequest) -> GenerateRequest:
    """The /generate request this message makes. The options were checked as /generate checks
    them; a prompt /generate would refuse is an InvalidInputError (422, or an `error` event)."""
    options = body.generate.model_dump() if body.generate is not None else {}
    try:
        return GenerateRequest(prompt=image_prompt(body.message), **options)
    except ValidationError as e:
        details = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'generate'}: {str(err['msg']).removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise InvalidInputError(f"the message cannot be generated from: {details}") from None


@router.post("/chat", response_model=ChatResponse, responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
async def chat(
    body: ChatRequest, request: Request, classification: Classification, generation: Generation
) -> ChatResponse | EventSourceResponse:
    if wants_event_stream(request):
        return event_response(chat_events(body, classification, generation))
    if raw_format(request.headers.get("accept", "")):
        raise InvalidInputError("/chat answers application/json or text/event-stream")
    await generation.adapter(body.generate)  # an unknown adapter is a 404 before any model runs
    (result,) = await classification.classify([body.message])
    kind = chat_kind(result)
    image = None
    if kind == "image":
        done = await generation.run(generation_request(body), gone=lambda: disconnected(request))
        image = done.response()
    return ChatResponse(kind=kind, classification=result, image=image)


async def chat_events(
    body: ChatRequest, classification: ClassificationService, generation: GenerationService
) -> AsyncGenerator[Event, None]:
    await generation.adapter(body.generate)
    (result,) = await classification.classify([body.message])
    kind = chat_kind(result)
    yield event("classification", {"kind": kind, "classification": result.model_dump()})
    if kind == "image":
        async with aclosing(generation_events(generation.stream(generation_request(body)))) as events:
            async for item in events:
                yield item
