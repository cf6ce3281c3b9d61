"""Server-sent events for /generate and /chat (`Accept: text/event-stream`).

Events, each `data` one JSON object:
- `progress`: `{"image", "step", "total", "elapsed_s", "fraction"}` after every denoising step
  of image `image` (0-based); `fraction` is the request's overall progress in [0, 1].
- `image`: the same object the JSON answer of /generate has (`images`, `seed`, ...), last.
- `error`: the error envelope `{"error": {"type", "message"}}`; nothing follows it.
/chat sends a `classification` event first.

Streams come from Triton's decoupled `generate_stream` model. When the HTTP client goes away,
sse-starlette cancels the generator; leaving `AsyncTritonClient.generate_stream` cancels the
gRPC stream, and the model stops at its next step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from api.errors import public_error
from api.media import encode_image
from api.schemas import GenerateRequest, GenerateResponse
from api.state import AppState
from contract.codec import GenerateResult
from contract.errors import FluxServeError, ModelFailedError
from contract.specs import GenerateParams

EVENT_STREAM = "text/event-stream"


def wants_event_stream(request: Request) -> bool:
    return EVENT_STREAM in request.headers.get("accept", "")


def event(name: str, payload: Any) -> dict[str, str]:
    return {"event": name, "data": json.dumps(payload)}


def error_event(exc: BaseException, state: AppState | None = None) -> dict[str, str]:
    """The error envelope as an event, with the type and text a JSON answer would carry
    (api.errors.public_error): never Triton's text, an address or a stack trace. With `state`,
    a dead stub is reported to readiness as the JSON path's handler does."""
    if state is not None and isinstance(exc, ModelFailedError):
        state.readiness.model_failed(exc)
    _, kind, message = public_error(exc)
    return event("error", {"error": {"type": kind, "message": message}})


async def generation_events(state: AppState, body: GenerateRequest, seed: int) -> AsyncIterator[dict[str, str]]:
    """A streamed generation is admitted like a unary one (api.admission: over the per-request
    cost it is refused, and when the estimated wait is too long it is shed), as an `error` event.
    The trigger words are looked up once admitted, as in the unary path."""
    admission = state.admission.generation(body.width, body.height, body.steps, body.num_images)
    try:
        await admission.__aenter__()
    except FluxServeError as e:
        yield error_event(e)
        return
    try:
        try:
            prompt = await state.generation_prompt(body.prompt)
            images = body.image_params(prompt, seed)
        except FluxServeError as e:
            yield error_event(e, state)
            return
        async for item in _admitted_generation_events(state, body, images):
            yield item
    finally:
        await admission.__aexit__(None, None, None)


async def _admitted_generation_events(
    state: AppState, body: GenerateRequest, images: list[GenerateParams]
) -> AsyncIterator[dict[str, str]]:
    """`progress` events for all `body.num_images` images (run concurrently, so they share
    transformer steps in Triton), then one `image` event; or an `error` event."""
    started = time.perf_counter()
    events: asyncio.Queue = asyncio.Queue()
    done_steps = [0] * body.num_images
    total_steps = body.steps * body.num_images

    async def one(index: int) -> GenerateResult:
        async for progress, result in state.triton_generate.generate_stream(images[index]):
            if result is not None:  # the final response repeats the last step: no second event
                return result
            done_steps[index] = progress.step
            await events.put(
                event(
                    "progress",
                    {
                        "image": index,
                        "step": progress.step,
                        "total": progress.total,
                        "elapsed_s": round(progress.elapsed_s, 4),
                        "fraction": round(sum(done_steps) / total_steps, 4),
                    },
                )
            )
        raise RuntimeError("stream ended without an image")  # the client raises first; belt and braces

    tasks = [asyncio.create_task(one(i)) for i in range(body.num_images)]
    gathered = asyncio.gather(*tasks)
    getter: asyncio.Task | None = None
    try:
        while not gathered.done() or not events.empty():
            getter = asyncio.create_task(events.get())
            await asyncio.wait({getter, gathered}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        results: list[GenerateResult] = gathered.result()
    except Exception as e:  # noqa: BLE001  (an `error` event; public_error logs the exception)
        yield error_event(e, state)
        return
    finally:
        # Client gone (this generator cancelled) or one image failed: stop the others in Triton.
        for task in [*tasks, *([getter] if getter else [])]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    infer_s = time.perf_counter() - started
    state.metrics.items.labels("generate").inc(len(results))
    # Encoding large images takes tens of ms of CPU: off the event loop, as for unary answers.
    encoded = await asyncio.to_thread(lambda: [encode_image(r.image, body.output_format) for r in results])
    answer = GenerateResponse(
        images=[base64.b64encode(b).decode() for b in encoded],
        seed=images[0].seed,
        model_version=results[0].model_version,
        prompt=images[0].prompt,
        output_format=body.output_format,
        timings={"inference_s": round(infer_s, 4), "total_s": round(time.perf_counter() - started, 4)},
    )
    yield event("image", answer.model_dump())
