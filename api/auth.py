"""The operator key: `Authorization: Bearer <key>` on every /train route (and, when configured,
on /classify and /generate).

Keys come from `FLUXSERVE_API_KEYS` (comma-separated, each `key` or `name:key`, several at once so
a key can be rotated without downtime), else from the key file `make up` creates once
(`.fluxserve/api_key`, mode 0600). Only SHA-256 digests of the keys stay in memory, every digest is
compared in constant time, and no key is ever logged or echoed: a caller learns only "missing or
wrong key". With no key configured at all the training API refuses every call (fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 16
"""Shorter keys are refused at start-up: a guessable key is no key."""
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_bearer = HTTPBearer(auto_error=False, description="the operator key (see README: Operator key)")


class KeyConfigError(ValueError):
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


def parse_keys(spec: str) -> list[tuple[str, str]]:
    """`"a:k1, k2"` -> [("a", "k1"), ("key-…", "k2")]; KeyConfigError (never quoting a key) if unusable."""
    out: list[tuple[str, str]] = []
    for i, item in enumerate(p.strip() for p in spec.split(",")):
        if not item:
            continue
        name, sep, key = item.partition(":")
        if not sep:
            name, key = default_key_name(item), item
        name, key = name.strip(), key.strip()
        if not _NAME_RE.match(name):
            raise KeyConfigError(f"API key #{i + 1}: the name must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise KeyConfigError(f"API key #{i + 1} ({name}): keys need at least {MIN_KEY_CHARS} characters, no spaces")
        out.append((name, key))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise KeyConfigError("API key names must be unique")
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
    """Keys from the setting when given, else from `key_file` when it exists, else none."""
    if keys and keys.strip():
        ring = KeyRing(parse_keys(keys))
        log.info("operator keys from FLUXSERVE_API_KEYS: %s", ", ".join(ring.names))
        return ring
    if key_file is not None and key_file.is_file():
        ring = KeyRing(parse_keys(key_file.read_text()))
        log.info("operator key from %s (%s)", key_file, ", ".join(ring.names))
        return ring
    log.warning("no operator key configured (FLUXSERVE_API_KEYS or %s): /train refuses every call", key_file)
    return KeyRing([])


def ensure_key_file(path: Path) -> bool:
    """Create `path` holding a new random key, once (mode 0600 in a 0700 folder); True if created.

    O_EXCL: an existing file is never overwritten (rotating is the operator's explicit act)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    return True


def unauthorized(message: str = "a valid operator key is required: Authorization: Bearer <key>") -> HTTPException:
    return HTTPException(status_code=401, detail=message, headers={"WWW-Authenticate": "Bearer"})


def _keyring(request: Request) -> KeyRing:
    from api.state import app_state  # api.state names KeyRing: imported here, not at the top

    return app_state(request).keyring


async def require_operator(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> str:
    """FastAPI dependency: the name of the caller's key, or 401 (the key's name is the job owner)."""
    ring = _keyring(request)
    if credentials is None or not credentials.credentials:
        raise unauthorized()
    name = ring.match(credentials.credentials)
    if name is None:
        log.info("refused %s %s: wrong operator key", request.method, request.url.path)
        raise unauthorized()
    return name


async def require_inference_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> str | None:
    """/classify and /generate: open unless FLUXSERVE_API_REQUIRE_KEY_FOR_INFERENCE is set."""
    from api.state import app_state

    if not app_state(request).settings.require_key_for_inference:
        return None
    return await require_operator(request, credentials)
