"""One error envelope for every failure: {"error": {"type": ..., "message": ...}}.

Messages are built from validation details or our own exception text; stack traces, paths,
internal addresses and Triton's raw text never reach the caller: those go to the log, whose lines
carry the request id the caller also gets in `X-Request-ID` (api.request_id).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.request_id import current_request_id
from contract.errors import (
    FluxServeError,
    InferenceError,
    InvalidInputError,
    ModelNotReadyError,
    OverloadedError,
    RequestCancelledError,
    RequestTimeoutError,
    ServerUnavailableError,
    UnknownAdapterError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublicError:
    """What a caller gets for one kind of failure."""

    status: int
    type: str
    """The envelope's stable `type`."""
    server_message: str
    """What a caller reads when the failure was raised from a lower layer's exception (Triton's
    text, gRPC details): a short, stable sentence; the original goes to the log."""


# The one table of our failures, for JSON answers and SSE `error` events alike. The first row
# whose class the exception is an instance of decides, so a subclass comes before its base.
ERRORS: tuple[tuple[type[FluxServeError], PublicError], ...] = (
    (UnknownAdapterError, PublicError(404, "not_found", "the adapter the request names does not exist")),
    (InvalidInputError, PublicError(422, "invalid_request", "the inference server refused the request as invalid")),
    (ModelNotReadyError, PublicError(503, "unavailable", "the model is not ready; try again later")),
    # Also overload (OverloadedError), a dead stub (ModelFailedError) and a server stopping.
    (
        ServerUnavailableError,
        PublicError(503, "unavailable", "the inference server is unavailable; try again later"),
    ),
    (RequestTimeoutError, PublicError(504, "timeout", "the request timed out")),
    (InferenceError, PublicError(502, "inference_failed", "inference failed")),
    # nginx's "client closed request": only logs and metrics see it.
    (RequestCancelledError, PublicError(499, "cancelled", "the request was cancelled")),
)
OTHER_ERROR = PublicError(500, "error", "inference failed")
"""A FluxServeError of no row above."""

# Stable `type` for the statuses Starlette/FastAPI raise themselves (unknown route, wrong method...).
HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def error_body(kind: str, message: str) -> dict[str, dict[str, str]]:
    """The one error envelope: `{"error": {"type": kind, "message": message}}`."""
    return {"error": {"type": kind, "message": message}}


def envelope(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(kind, message), headers=headers)


def public_kind(exc: FluxServeError) -> PublicError:
    """`exc`'s row of the table."""
    return next((row for cls, row in ERRORS if isinstance(exc, cls)), OTHER_ERROR)


def public_message(exc: FluxServeError) -> str:
    """Our own messages as they are (validation, admission); a message built from a lower layer's
    exception (Triton's text, gRPC details) replaced by a fixed one, the original going to the log;
    an exception whose message is always our own (`own_message`) keeps it either way."""
    if exc.__cause__ is None or exc.own_message:
        return str(exc)
    return f"{public_kind(exc).server_message} (request id {current_request_id()})"


def public_error(exc: BaseException) -> tuple[int, str, str]:
    """(status, type, message) of the envelope for `exc`: the one mapping for JSON answers and
    SSE `error` events alike. The full exception goes to the log, under the request id the
    message names."""
    if not isinstance(exc, FluxServeError):
        log.error("unhandled error", exc_info=exc)
        return 500, "internal_error", f"internal error; request id {current_request_id()}"
    row = public_kind(exc)
    if not isinstance(exc, OverloadedError):  # refusals are counted in /metrics, not logged one by one
        log.warning("%s -> %d: %s", type(exc).__name__, row.status, exc)
    return row.status, row.type, public_message(exc)


def retry_after(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds (RFC 9110), at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def error_messages(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> tuple[dict, dict]:
    """The error envelope as the two raw ASGI messages (start, body) that answer with it."""
    body = json.dumps(error_body(kind, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": raw}, {
        "type": "http.response.body",
        "body": body,
    }


async def send_error(send, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
    """The error envelope as raw ASGI messages, for middlewares that answer before routing."""
    start, body = error_messages(status, kind, message, headers)
    await send(start)
    await send(body)


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = []
        for err in exc.errors():
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            msgs.append(f"{_loc(tuple(err.get('loc', ())))}: {msg}")
        return envelope(422, "invalid_request", "; ".join(msgs))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return envelope(exc.status_code, HTTP_TYPES.get(exc.status_code, "http_error"), str(exc.detail), exc.headers)

    @app.exception_handler(FluxServeError)
    async def _flux(request: Request, exc: FluxServeError) -> JSONResponse:
        if isinstance(exc, OverloadedError):  # paced like the early refusals (api/shedding.py)
            state = request.app.state.fluxserve
            await state.pacer.held(request.scope.get("client"), state.lag_s())
        status, kind, message = public_error(exc)
        # Every 503 says when to come back: overload, Triton restarting, a model reloading.
        headers = retry_after(exc.retry_after_s) if isinstance(exc, ServerUnavailableError) else None
        return envelope(status, kind, message, headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return envelope(*public_error(exc))
