"""POST /chat: one call per chat message. Classify it; if it asks for an image (and the
classifier is sure), generate from it in the same call.

The prompt sent to FLUX is the message with its request phrasing removed (api/prompt_rewrite.py).
With `Accept: text/event-stream` the answer streams: `classification` first, then the
generation's `progress` events and its `image` (api/event_stream.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse

from api.auth import require_inference_key
from api.event_stream import error_event, event, generation_events, wants_event_stream
from api.media import raw_format
from api.prompt_rewrite import image_prompt
from api.routes.generate import generate
from api.schemas import ChatKind, ChatRequest, ChatResponse, ClassifyResult, ErrorResponse, GenerateRequest
from api.state import AppState, get_state
from contract.errors import FluxServeError, InvalidInputError
from contract.specs import IMAGE_REQUEST, random_seed

# /chat runs the classifier and the generator: the inference key guards it as it guards them
# (it used to call the /generate route function directly and so skipped that lock).
router = APIRouter(tags=["chat"], dependencies=[Depends(require_inference_key)])

ERRORS = {422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}}


def chat_kind(result: ClassifyResult) -> ChatKind:
    if result.uncertain:
        return "uncertain"
    return "image" if result.label == IMAGE_REQUEST else "conversation"


async def classify_message(state: AppState, message: str) -> ClassifyResult:
    (result,) = await state.classify([message])
    threshold = await state.classify_threshold(result.model_version)
    state.metrics.items.labels("classify").inc()
    return ClassifyResult(
        label=result.label, score=result.score, scores=result.scores, uncertain=result.score < threshold
    )


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
    body: ChatRequest, request: Request, state: Annotated[AppState, Depends(get_state)]
) -> ChatResponse | EventSourceResponse:
    if wants_event_stream(request):
        return EventSourceResponse(chat_events(body, state))
    if raw_format(request.headers.get("accept", "")):
        raise InvalidInputError("/chat answers application/json or text/event-stream")
    classification = await classify_message(state, body.message)
    kind = chat_kind(classification)
    image = await generate(generation_request(body), request, state) if kind == "image" else None
    return ChatResponse(kind=kind, classification=classification, image=image)


async def chat_events(body: ChatRequest, state: AppState) -> AsyncIterator[dict[str, str]]:
    try:
        classification = await classify_message(state, body.message)
    except FluxServeError as e:
        yield error_event(e, state)
        return
    kind = chat_kind(classification)
    yield event("classification", {"kind": kind, "classification": classification.model_dump()})
    if kind != "image":
        return
    try:
        gen = generation_request(body)
        seed = gen.seed if gen.seed is not None else random_seed()
    except FluxServeError as e:
        yield error_event(e, state)
        return
    async for item in generation_events(state, gen, seed):
        yield item
