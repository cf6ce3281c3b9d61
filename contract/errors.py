"""The client's exception hierarchy. Every Triton exception is translated here, once."""

from __future__ import annotations

import re

from tritonclient.utils import InferenceServerException

DEFAULT_RETRY_AFTER_S = 5.0
"""What a 503 tells a client to wait when nobody measured better (Triton down, model loading)."""
_DEAD_STUB = re.compile(r"Stub process '([A-Za-z0-9_.-]+?)_\d+_\d+' is not healthy")
_UNKNOWN_ADAPTER = re.compile(r"no adapter named '([a-z0-9][a-z0-9_-]{0,63})'")
"""common.adapter_store.AdapterNotFound's message, as the models inside Triton pass it on."""


class FluxServeError(Exception):
    """Base class for everything the client raises."""

    own_message: bool = False
    """True when the message is always built here from checked values (never a lower layer's
    text), so a caller may be shown it even when the exception was translated from Triton's."""


class InvalidInputError(FluxServeError, ValueError):
    """The request was refused as malformed, by this client or by the server."""


class UnknownAdapterError(InvalidInputError):
    """The request names an adapter (`lora`) that is not published (404 at the facade, an
    INVALID_ARG from Triton)."""

    own_message = True

    def __init__(self, name: str) -> None:
        super().__init__(f"no adapter named {name!r}")
        self.name = name


class ServerUnavailableError(FluxServeError):
    """Triton could not be reached (not running, connection refused, shutting down)."""

    def __init__(self, message: str, retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OverloadedError(ServerUnavailableError):
    """Refused for lack of capacity (admission control or a full Triton queue): retry later."""


class ModelFailedError(ServerUnavailableError):
    """A model's python stub process died (e.g. killed for memory); `model` needs a reload."""

    def __init__(self, message: str, model: str) -> None:
        super().__init__(message)
        self.model = model


class RequestCancelledError(FluxServeError):
    """The request was cancelled (its client went away) before it completed."""


class ModelNotReadyError(ServerUnavailableError):
    """Triton is up but the model is unknown, loading or unloaded."""


class RequestTimeoutError(FluxServeError):
    """The request did not complete within its deadline."""


class InferenceError(FluxServeError):
    """The model failed while running the request."""


def translate(e: InferenceServerException) -> FluxServeError:
    """Map a tritonclient exception to our hierarchy (use as `raise translate(e) from e`)."""
    status = str(e.status() or "")
    message = e.message() or str(e)
    lowered = message.lower()
    if "exceeds maximum queue size" in lowered:
        return OverloadedError(f"server busy: {message}")
    dead = _DEAD_STUB.search(message)
    if dead:
        return ModelFailedError(f"model {dead.group(1)!r} failed and is being recovered: {message}", dead.group(1))
    unknown_adapter = _UNKNOWN_ADAPTER.search(message)
    if unknown_adapter:
        return UnknownAdapterError(unknown_adapter.group(1))
    if "CANCELLED" in status:
        return RequestCancelledError(message)
    if "UNAVAILABLE" in status or "failed to connect" in lowered or "connection refused" in lowered:
        return ServerUnavailableError(f"Triton is unavailable: {message}")
    if "DEADLINE_EXCEEDED" in status or "deadline exceeded" in lowered or "timeout" in lowered:
        return RequestTimeoutError(f"request timed out: {message}")
    if "unknown model" in lowered or "not ready" in lowered or "NOT_FOUND" in status:
        return ModelNotReadyError(message)
    if "INVALID_ARG" in status:
        return InvalidInputError(message)
    return InferenceError(message)


class ApiError(FluxServeError):
    """The HTTP facade answered with an error envelope: `status`, stable `kind`, short message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.kind, self.message = status, kind, message


class AuthenticationError(ApiError):
    """401: the operator key is missing or wrong (see docs/operations.md: Operator key)."""
