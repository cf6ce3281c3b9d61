"""Secrets that cannot be placeholders: the one check every secret fluxserve reads goes through.

An example value copied as is (`change-me`, `operator:change-me-change-me`) works exactly like a
real secret: whoever has read the example can train and publish, or forge queue messages. So the
facade (operator keys), the worker (queue secret, Redis password) and the Triton launcher (control
key) refuse to start on a value that is a known placeholder, too short, or too repetitive to have
been drawn at random, and say which variable to set and how to make a good value. Messages never
quote the value itself.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

MIN_SECRET_CHARS = 16
"""Shorter secrets are refused: a guessable secret is no secret."""
MIN_DISTINCT_CHARS = 5
"""`aaaa…`, `abab…`, `1234…` are typed, not drawn: 16 random hex digits have fewer than 5 distinct
characters about once in a million draws (and a refusal only asks for another draw)."""
PLACEHOLDER_WORDS = (
    "changeme",
    "changeit",
    "replaceme",
    "placeholder",
    "example",
    "secret",
    "password",
    "passwd",
    "letmein",
    "default",
    "insecure",
)
"""Found anywhere in the value (case and punctuation ignored), they mark a placeholder. All are at
least 6 letters, so a random value contains one by chance less than once in ten million."""
HOW_TO_GENERATE = "generate one with `openssl rand -hex 24`"


class SecretConfigError(ValueError):
    """A configured secret is unusable: the process refuses to start (the message names the variable)."""


def secret_problem(value: str, min_chars: int = MIN_SECRET_CHARS) -> str | None:
    """Why `value` cannot be a real secret, else None. The answer never quotes `value`."""
    folded = re.sub(r"[^a-z0-9]", "", value.lower())
    word = next((w for w in PLACEHOLDER_WORDS if w in folded), None)
    if word is not None:
        return f"it is a placeholder (it contains {word!r})"
    if len(value) < min_chars:
        return f"it is too short to be random ({len(value)} characters; at least {min_chars})"
    if len(set(value)) < MIN_DISTINCT_CHARS:
        return f"it is too repetitive to be random (fewer than {MIN_DISTINCT_CHARS} distinct characters)"
    return None


def require_strong_secret(variable: str, value: str, min_chars: int = MIN_SECRET_CHARS) -> None:
    """SecretConfigError naming `variable` unless `value` passes `secret_problem`."""
    problem = secret_problem(value, min_chars)
    if problem is not None:
        raise SecretConfigError(f"{variable} is unusable: {problem}; {HOW_TO_GENERATE} and set it")


def create_secret_file(path: Path) -> bool:
    """Write a new random secret to `path`, once (mode 0600 in a 0700 folder); True if created.

    O_EXCL: an existing file is never overwritten (rotating is the operator's explicit act), and of
    processes racing to create it exactly one writes it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    return True


def read_private_file(path: Path) -> str:
    """The text of the secret file `path`; SecretConfigError (naming the file and the chmod that
    fixes it) when group or others may read or write it: a secret other users can read is shared."""
    with path.open() as fh:  # the mode of the file read, not of whatever the path named a moment before
        mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretConfigError(
                f"{path} is open to other users (mode {mode:04o}); run `chmod 600 {path}` and start again"
            )
        return fh.read()
