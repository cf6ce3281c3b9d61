"""The operator keys: where they come from, their grammar, and how a presented key is matched.

Keys come from `FLUXSERVE_API_KEYS` (comma-separated, each `key` or `name:key`, several at once so
a key can be rotated without downtime), else from the key file `make up` creates once
(`.fluxserve/api_key`, mode 0600; refused when group or others may read it). The grammar has one
reading: a key is a bearer token (A-Z a-z 0-9 - . _ ~ + /, then any `=`), so it contains neither
`,` nor `:`, and an item with a `:` is always `name:key`. A key that is a placeholder or too short
or repetitive to be random is refused (common.secret_strength): the facade does not start.

Only SHA-256 digests of the keys stay in memory, every digest is compared in constant time, and no
key is ever logged. Checking a request's key is api.auth's part (it reads the KeyRing that
api.state holds); this module knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from common.secret_strength import (
    MIN_SECRET_CHARS,
    SecretConfigError,
    create_secret_file,
    read_private_file,
    secret_problem,
)

log = logging.getLogger(__name__)

MIN_KEY_CHARS = MIN_SECRET_CHARS
KEYS_VARIABLE = "FLUXSERVE_API_KEYS"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")
"""RFC 6750's bearer token (token68): what a client can send, and never a `,` or a `:`."""


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
