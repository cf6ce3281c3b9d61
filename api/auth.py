"""The operator key on requests: `Authorization: Bearer <key>` on every /train route (and, when
configured, on every route that runs a model).

The keys themselves (where they come from, their grammar, constant-time matching) are api.keys';
the KeyRing lives in api.state. A caller learns only "missing or wrong key"; wrong keys are
limited per client (api.auth_limit: 429 with Retry-After after a burst). With no key configured
at all the training API refuses every call (fail closed).
"""

from __future__ import annotations

import logging
import math

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.auth_limit import client_id
from api.state import app_state

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="the operator key (see docs/operations.md: Operator key)")


def unauthorized(message: str = "a valid operator key is required: Authorization: Bearer <key>") -> HTTPException:
    return HTTPException(status_code=401, detail=message, headers={"WWW-Authenticate": "Bearer"})


def too_many_failures(retry_after_s: float) -> HTTPException:
    seconds = max(1, math.ceil(retry_after_s))
    return HTTPException(
        status_code=429,
        detail=f"too many wrong operator keys from this client; try again in {seconds} s",
        headers={"Retry-After": str(seconds)},
    )


def _check_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str:
    """The name of the presented key; 429 while the client is limited (before the key is looked
    at), 401 when it is missing or wrong (a wrong one counts against the client)."""
    state = app_state(request)
    client = client_id(request.client.host if request.client else None)
    wait = state.auth_failures.retry_after(client)
    if wait is not None:
        raise too_many_failures(wait)
    if credentials is None or not credentials.credentials:
        raise unauthorized()
    name = state.keyring.match(credentials.credentials)
    if name is None:
        state.auth_failures.failed(client)
        # DEBUG, not INFO: a guessing client would write a line per guess (the limiter warns once).
        log.debug("refused %s %s: wrong operator key", request.method, request.url.path)
        raise unauthorized()
    return name


async def require_operator(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> str:
    """FastAPI dependency: the name of the caller's key, or 401/429 (the key's name is the job owner)."""
    return _check_key(request, credentials)


async def optional_operator(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> str | None:
    """FastAPI dependency for routes open to all that show operators more: None without an
    Authorization header; a key that is presented must be right (401/429 as for /train)."""
    if credentials is None and "authorization" not in request.headers:
        return None
    return _check_key(request, credentials)


async def require_inference_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> str | None:
    """Every route that runs a model (api.routes.inference): open unless
    FLUXSERVE_API_REQUIRE_KEY_FOR_INFERENCE is set."""
    if not app_state(request).settings.require_key_for_inference:
        return None
    return _check_key(request, credentials)
