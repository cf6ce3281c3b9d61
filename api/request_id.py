"""A request id on every response (`X-Request-ID`) and on every log line written for the request.

The caller's id is kept when it is sane (short, plain characters: it ends up in logs), else a new
one is made. It lives in a context variable, which asyncio tasks and Starlette's thread pool
inherit, and a logging filter copies it into each record as `request_id`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

log = logging.getLogger(__name__)


def current_request_id() -> str:
    """The id of the request being served ("-" outside one)."""
    return _current.get()


def request_id_from(value: str | None) -> str:
    return value if value and _SANE.match(value) else uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current.get()
        return True


def configure_logging(level: int = logging.INFO) -> None:
    """Root logging with the request id in every line (uvicorn's loggers too: run it with
    `log_config=None` so they propagate here instead of to handlers of their own)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


class RequestIdMiddleware:
    """Outermost of ours: sets the id, stamps the response, and turns an exception that escaped
    everything else into the error envelope (with the id) instead of a bare 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = request_id_from(given)
        token = _current.set(rid)
        started = False

        async def stamped_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (HEADER.lower().encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, stamped_send)
        except ClientDisconnect:
            # The caller went away mid-body (an aborted upload): nobody to answer, nothing broken.
            log.info("client disconnected during %s %s", scope.get("method"), scope.get("path"))
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            body = json.dumps(
                {"error": {"type": "internal_error", "message": f"internal error; request id {rid}"}}
            ).encode()
            await stamped_send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            _current.reset(token)
