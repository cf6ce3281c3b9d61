"""POST /generate: FLUX images as base64 JSON, or raw bytes with `Accept: image/png` etc."""

from __future__ import annotations

import base64
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api.auth import require_inference_key
from api.cancellation import all_or_nothing, bounded
from api.event_stream import EVENT_STREAM, generation_events, wants_event_stream
from api.media import MEDIA_TYPES, encode_image, raw_format
from api.schemas import ErrorResponse, GenerateRequest, GenerateResponse
from api.state import AppState, get_state
from contract.errors import InvalidInputError
from contract.specs import GENERATE, random_seed

router = APIRouter(tags=["generate"], dependencies=[Depends(require_inference_key)])

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
    body: GenerateRequest, request: Request, state: Annotated[AppState, Depends(get_state)]
) -> GenerateResponse | Response:
    settings = state.settings
    seed = body.seed if body.seed is not None else random_seed()
    if wants_event_stream(request):
        return EventSourceResponse(generation_events(state, body, seed))
    raw = raw_format(request.headers.get("accept", ""))
    if raw and body.num_images != 1:
        raise InvalidInputError("raw image responses carry one image: use num_images=1 or Accept: application/json")
    started = time.perf_counter()
    async with state.admission.generation(body.width, body.height, body.steps, body.num_images):
        # Admitted first: the trigger word asks Triton which version serves, and a refused request
        # must cost nothing more than the refusal (issue 24).
        prompt = await state.generation_prompt(body.prompt)
        # Images of one request run concurrently, so they share transformer steps in Triton; they
        # share one fate too, and all are cancelled when the client leaves or the deadline passes.
        work = all_or_nothing(*(state.triton_generate.generate(params) for params in body.image_params(prompt, seed)))
        results = await bounded(request, work, settings.generate_timeout_s, state.stopping)
    infer_s = time.perf_counter() - started
    state.readiness.served(GENERATE.name)
    state.metrics.items.labels("generate").inc(len(results))
    fmt = raw or body.output_format
    # PNG/JPEG encoding of large images takes tens of ms of CPU: keep it off the event loop.
    encoded = await run_in_threadpool(lambda: [encode_image(r.image, fmt) for r in results])
    timings = {"inference_s": round(infer_s, 4), "total_s": round(time.perf_counter() - started, 4)}
    if raw:
        headers = {
            "X-Seed": str(seed),
            "X-Model-Version": results[0].model_version,
            "X-Inference-Seconds": str(timings["inference_s"]),
        }
        return Response(encoded[0], media_type=MEDIA_TYPES[fmt], headers=headers)
    return GenerateResponse(
        images=[base64.b64encode(b).decode() for b in encoded],
        seed=seed,
        model_version=results[0].model_version,
        prompt=prompt,
        output_format=fmt,
        timings=timings,
    )
