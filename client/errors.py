"""The client's exception hierarchy. Every Triton exception is translated here, once."""

from __future__ import annotations

from tritonclient.utils import InferenceServerException


class FluxServeError(Exception):
    """Base class for everything the client raises."""


class InvalidInputError(FluxServeError, ValueError):
    """The request was refused as malformed, by this client or by the server."""


class ServerUnavailableError(FluxServeError):
    """Triton could not be reached (not running, connection refused, shutting down)."""


class ModelNotReadyError(FluxServeError):
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
    """401: the operator key is missing or wrong (see README: Operator key)."""
