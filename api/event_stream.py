"""Server-sent events for /generate and /chat (`Accept: text/event-stream`): services' events as SSE.

Events, each `data` one JSON object:
- `progress`: `{"image", "step", "total", "elapsed_s", "fraction"}` after every denoising step
  of image `image` (0-based); `fraction` is the request's overall progress in [0, 1].
- `image`: the same object the JSON answer of /generate has (`images`, `seed`, ...), last.
- `error`: the error envelope `{"error": {"type", "message"}}` with the type and text the JSON
  answer to the same failure carries (api.errors.public_error); nothing follows it.
/chat sends a `classification` event first.

Streams come from api.services.generation (Triton's decoupled `generate_stream` model). When the
HTTP client goes away, sse-starlette cancels the generator, which cancels the work in Triton.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import asdict
from typing import Any

from fastapi import Request
from sse_starlette.sse import EventSourceResponse

from api.errors import error_body, public_error
from api.services.generation import Done, GenerationEvent

EVENT_STREAM = "text/event-stream"

Event = dict[str, str]


def wants_event_stream(request: Request) -> bool:
    return EVENT_STREAM in request.headers.get("accept", "")


def event(name: str, payload: Any) -> Event:
    return {"event": name, "data": json.dumps(payload)}


def error_event(exc: BaseException) -> Event:
    """The error envelope as an event, with the type and text a JSON answer would carry: never
    Triton's text, an address or a stack trace."""
    _, kind, message = public_error(exc)
    return event("error", error_body(kind, message))


async def generation_events(events: AsyncGenerator[GenerationEvent, None]) -> AsyncGenerator[Event, None]:
    """`progress` events, then the `image` event. Closing this closes `events` (and so cancels
    the work) at once, not when the garbage collector gets to it; so does every nesting here."""
    async with aclosing(events):
        async for item in events:
            if isinstance(item, Done):
                yield event("image", item.response().model_dump())
            else:
                yield event("progress", asdict(item))


def event_response(events: AsyncGenerator[Event, None]) -> EventSourceResponse:
    """`events` as an SSE answer; a failure anywhere in them ends it with one `error` event."""
    return EventSourceResponse(_ending_in_error(events))


async def _ending_in_error(events: AsyncGenerator[Event, None]) -> AsyncIterator[Event]:
    async with aclosing(events):
        try:
            async for item in events:
                yield item
        except Exception as e:  # noqa: BLE001  (an `error` event; public_error logs the exception)
            yield error_event(e)
