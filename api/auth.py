"""The operator key: `Authorization: Bearer <key>` on every /train route (and, when configured,
on /classify and /generate).

Keys come from `FLUXSERVE_API_KEYS` (comma-separated, each `key` or `name:key`, several at once so
a key can be rotated without downtime), else from the key file `make up` creates once
(`.fluxserve/api_key`, mode 0600; refused when group or others may read it). The grammar has one
reading: a key is a bearer token (A-Z a-z 0-9 - . _ ~ + /, then any `=`), so it contains neither
`,` nor `:`, and an item with a `:` is always `name:key`. A key that is a placeholder or too short
or repetitive to be random is refused (common.secret_strength): the facade does not start.

Only SHA-256 digests of the keys stay in memory, every digest is compared in constant time, and no
key is ever logged or echoed: a caller learns only "missing or wrong key". Wrong keys are limited
per client (api.auth_limit: 429 with Retry-After after a burst). With no key configured at all the
training API refuses every call (fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.auth_limit import client_id
from common.secret_strength import (
    MIN_SECRET_CHARS,
    SecretConfigError,
    create_secret_file,
    read_private_file,
    secret_problem,
)

if TYPE_CHECKING:  # api.state imports this module's KeyRing: only for the type checker here
    from api.state import AppState

log = logging.getLogger(__name__)

MIN_KEY_CHARS = MIN_SECRET_CHARS
KEYS_VARIABLE = "FLUXSERVE_API_KEYS"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")
"""RFC 6750's bearer token (token68): what a client can send, and never a `,` or a `:`."""
_bearer = HTTPBearer(auto_error=False, description="the operator key (see README: Operator key)")


class KeyConfigError(SecretConfigError):
    """The configured keys are unusable (the facade refuses to start)."""


@dataclass(frozen=True)
class _Key:
    name: str
    digest: bytes


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def default_key_name(key: str) -> str:
    """A stable name for an unnamed key (survives rotation of the others; reveals nothing usable)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_keys(spec: str, source: str = KEYS_VARIABLE) -> list[tuple[str, str]]:
    """`"a:k1, k2"` -> [("a", "k1"), ("key-…", "k2")]; KeyConfigError naming `source` (the variable or
    the file) and never quoting a key when any item is unusable."""
    out: list[tuple[str, str]] = []
    for i, item in enumerate(p.strip() for p in spec.split(",")):
        if not item:
            continue
        where = f"{source}: key #{i + 1}"
        if item.count(":") > 1:
            raise KeyConfigError(
                f"{where} has more than one ':' (an item is `key` or `name:key`, and a key has no ':')"
            )
        name, sep, key = item.partition(":")
        if not sep:
            name, key = default_key_name(item), item
        name, key = name.strip(), key.strip()
        if not _NAME_RE.match(name):
            raise KeyConfigError(f"{where}: the name must be 1-64 characters of A-Z a-z 0-9 _ . -")
        where = f"{source}: key #{i + 1} ({name})"
        if not _KEY_RE.match(key):
            raise KeyConfigError(f"{where}: a key is made of A-Z a-z 0-9 - . _ ~ + / (then any '='), no spaces")
        problem = secret_problem(key, MIN_KEY_CHARS)
        if problem is not None:
            raise KeyConfigError(f"{where} is unusable: {problem}; generate one with `openssl rand -hex 24`")
        out.append((name, key))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise KeyConfigError(f"{source}: key names must be unique")
    return out


class KeyRing:
    """The accepted keys, as digests. `match` is constant-time in the presented key and in which
    key (if any) it equals: every digest is compared, with no early exit."""

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        self._keys = tuple(_Key(name, _digest(key)) for name, key in keys)

    @property
    def configured(self) -> bool:
        return bool(self._keys)

    @property
    def names(self) -> list[str]:
        return [k.name for k in self._keys]

    def match(self, presented: str) -> str | None:
        """The name of the key equal to `presented`, else None."""
        digest = _digest(presented)
        found: str | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key.name
        return found


def load_keyring(keys: str | None, key_file: Path | None) -> KeyRing:
    """Keys from the setting when given, else from `key_file` when it exists (and only its owner
    may read it), else none."""
    if keys and keys.strip():
        ring = KeyRing(parse_keys(keys))
        log.info("operator keys from %s: %s", KEYS_VARIABLE, ", ".join(ring.names))
        return ring
    if key_file is not None and key_file.is_file():
        try:
            text = read_private_file(key_file)
        except SecretConfigError as e:
            raise KeyConfigError(str(e)) from None
        ring = KeyRing(parse_keys(text, str(key_file)))
        log.info("operator key from %s (%s)", key_file, ", ".join(ring.names))
        return ring
    log.warning("no operator key configured (%s or %s): /train refuses every call", KEYS_VARIABLE, key_file)
    return KeyRing([])


def ensure_key_file(path: Path) -> bool:
    """Create the operator key file `path` once (common.secret_strength.create_secret_file); True if created."""
    return create_secret_file(path)


def unauthorized(message: str = "a valid operator key is required: Authorization: Bearer <key>") -> HTTPException:
    return HTTPException(status_code=401, detail=message, headers={"WWW-Authenticate": "Bearer"})


def too_many_failures(retry_after_s: float) -> HTTPException:
    seconds = max(1, math.ceil(retry_after_s))
    return HTTPException(
        status_code=429,
        detail=f"too many wrong operator keys from this client; try again in {seconds} s",
        headers={"Retry-After": str(seconds)},
    )


def _state(request: Request) -> AppState:
    from api.state import app_state  # api.state names KeyRing: imported here, not at the top

    return app_state(request)


def _check_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str:
    """The name of the presented key; 429 while the client is limited (before the key is looked
    at), 401 when it is missing or wrong (a wrong one counts against the client)."""
    state = _state(request)
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
    """/classify and /generate: open unless FLUXSERVE_API_REQUIRE_KEY_FOR_INFERENCE is set."""
    if not _state(request).settings.require_key_for_inference:
        return None
    return _check_key(request, credentials)
