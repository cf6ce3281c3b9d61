"""Request body limits enforced before the body is read (plain ASGI, like api.metrics).

A declared `Content-Length` over the route's limit is answered 413 at once, without reading a
byte of the body; a body without one (chunked) is counted as it arrives and cut off with 413 when
it passes the limit. So a 600 MB body costs the facade neither the time to read it nor the memory
to hold it, whatever the handler behind would have done with it.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import send_error


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes its limit. An HTTPException, so that
    FastAPI's body parsing re-raises it as it is (it turns other errors into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodyLimitMiddleware:
    """`limit_for(method, path)` gives the largest body (bytes) a request may carry."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _reject(send, limit)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            # Reached here only where nothing inside turned it into a response (e.g. a streaming
            # handler that let it propagate); answer it unless a response is already on its way.
            if not started:
                await _reject(send, limit)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server itself refuses a malformed length before we run
    return None


async def _reject(send: Send, limit: int) -> None:
    # The rest of the body is not read, so this connection cannot carry another request.
    await send_error(send, 413, "payload_too_large", f"request body larger than {limit} bytes", {"connection": "close"})
