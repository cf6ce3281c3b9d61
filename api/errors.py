"""One error envelope for every failure: {"error": {"type": ..., "message": ...}}.

Messages are built from validation details or our own exception text; stack traces, paths,
internal addresses and Triton's raw text never reach the caller: those go to the log, whose lines
carry the request id the caller also gets in `X-Request-ID` (api.request_id).
"""

from __future__ import annotations

import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.request_id import current_request_id
from contract.errors import (
    FluxServeError,
    InferenceError,
    InvalidInputError,
    ModelFailedError,
    ModelNotReadyError,
    OverloadedError,
    RequestCancelledError,
    RequestTimeoutError,
    ServerUnavailableError,
)

log = logging.getLogger(__name__)

STATUS: dict[type[FluxServeError], int] = {
    InvalidInputError: 422,
    ServerUnavailableError: 503,
    ModelNotReadyError: 503,
    RequestTimeoutError: 504,
    InferenceError: 502,
    RequestCancelledError: 499,  # nginx's "client closed request": only logs and metrics see it
}


# Stable `type` of the envelope per status of a FluxServeError.
ERROR_TYPES = {
    422: "invalid_request",
    503: "unavailable",
    504: "timeout",
    502: "inference_failed",
    499: "cancelled",
}

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
# What a caller reads when Triton produced the error: a short, stable sentence per kind.
SERVER_MESSAGES: dict[type[FluxServeError], str] = {
    InvalidInputError: "the inference server refused the request as invalid",
    ServerUnavailableError: "the inference server is unavailable; try again later",
    ModelNotReadyError: "the model is not ready; try again later",
    RequestTimeoutError: "the request timed out",
    InferenceError: "inference failed",
}


def envelope(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message}}, headers=headers)


def public_message(exc: FluxServeError) -> str:
    """Our own messages as they are (validation, admission); a message built from a lower layer's
    exception (Triton's text, gRPC details) replaced by a fixed one, the original going to the log."""
    if exc.__cause__ is None:
        return str(exc)
    cls = next((c for c in SERVER_MESSAGES if isinstance(exc, c)), InferenceError)
    return f"{SERVER_MESSAGES[cls]} (request id {current_request_id()})"


def public_error(exc: BaseException) -> tuple[int, str, str]:
    """(status, type, message) of the envelope for `exc`: the one mapping for JSON answers and
    SSE `error` events alike. The full exception goes to the log, under the request id the
    message names."""
    if not isinstance(exc, FluxServeError):
        log.error("unhandled error", exc_info=exc)
        return 500, "internal_error", f"internal error; request id {current_request_id()}"
    status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)
    if not isinstance(exc, OverloadedError):  # refusals are counted in /metrics, not logged one by one
        log.warning("%s -> %d: %s", type(exc).__name__, status, exc)
    return status, ERROR_TYPES.get(status, "error"), public_message(exc)


def retry_after(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds (RFC 9110), at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def error_messages(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> tuple[dict, dict]:
    """The error envelope as the two raw ASGI messages (start, body) that answer with it."""
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
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
        if isinstance(exc, ModelFailedError):  # a dead stub: readiness reports it and reloads the model
            request.app.state.fluxserve.readiness.model_failed(exc)
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
