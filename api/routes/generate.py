"""POST /generate: FLUX images as base64 JSON, raw bytes with `Accept: image/png` etc., or progress
events with `Accept: text/event-stream`. An adapter: the work and its rules are
api.services.generation's; this only picks the answer's form."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from sse_starlette.sse import EventSourceResponse

from api.cancellation import disconnected
from api.event_stream import EVENT_STREAM, event_response, generation_events, wants_event_stream
from api.media import MEDIA_TYPES, raw_format
from api.schemas import ErrorResponse, GenerateRequest, GenerateResponse
from api.services.generation import GenerationService, generation_service
from contract.errors import InvalidInputError

router = APIRouter(tags=["generate"])
"""Included by api.routes.inference, behind the inference key."""

ERRORS = {
    422: {"model": ErrorResponse},
    503: {"model": ErrorResponse, "description": "busy or recovering: see Retry-After"},
    504: {"model": ErrorResponse},
}


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        **ERRORS,
        200: {
            "content": {**{m: {} for m in MEDIA_TYPES.values()}, EVENT_STREAM: {}},
            "description": "JSON; raw image bytes with Accept: image/*; progress events with Accept: text/event-stream",
        },
    },
)
async def generate(
    body: GenerateRequest, request: Request, service: Annotated[GenerationService, Depends(generation_service)]
) -> GenerateResponse | Response | EventSourceResponse:
    if wants_event_stream(request):
        return event_response(generation_events(service.stream(body)))
    raw = raw_format(request.headers.get("accept", ""))
    if raw is None:
        return (await service.run(body, gone=lambda: disconnected(request))).response()
    if body.num_images != 1:
        raise InvalidInputError("raw image responses carry one image: use num_images=1 or Accept: application/json")
    done = await service.run(body.model_copy(update={"output_format": raw}), gone=lambda: disconnected(request))
    headers = {
        "X-Seed": str(done.seed),
        "X-Model-Version": done.model_version,
        "X-Inference-Seconds": str(done.timings["inference_s"]),
    }
    if done.lora is not None:
        headers |= {"X-Lora": done.lora.name, "X-Lora-Sha256": done.lora.sha256}
    return Response(done.images[0], media_type=MEDIA_TYPES[raw], headers=headers)
