"""The Triton control key: the header that Triton's model-control and model-config APIs require.

Triton runs in explicit model-control mode so that publishes can load new versions, and its load
API accepts a `config` and `file:` overrides: whoever can call it runs code inside Triton (a
python model's `initialize`). Triton therefore starts with those API groups restricted
(`--http-restricted-api` / `--grpc-restricted-protocol`): a call without the header
`CONTROL_KEY_HEADER: <key>` (gRPC: `GRPC_CONTROL_KEY_HEADER`) is refused, on HTTP and gRPC alike. A custom header also makes a
browser send a CORS preflight, which Triton does not answer, so a web page cannot call them.
Health, metadata, statistics and inference stay open: the facade and direct gRPC clients need no key.

The key comes from `FLUXSERVE_TRITON_CONTROL_KEY` (compose and Kubernetes: a secret), else from the
key file that `make up` creates once (`.fluxserve/triton_control_key`, mode 0600). The launcher,
every publisher (training worker, `fluxserve-export --triton-url`), the repository sync sidecar
and the facade (which reads model configs and reloads a crashed model) send it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.paths import PROJECT_ROOT
from common.secret_strength import SecretConfigError, create_secret_file, read_private_file, secret_problem

log = logging.getLogger(__name__)

CONTROL_KEY_HEADER = "fluxserve-control-key"
"""The HTTP header. Lower case: gRPC metadata keys must be."""
GRPC_CONTROL_KEY_HEADER = "triton-grpc-protocol-" + CONTROL_KEY_HEADER
"""The gRPC metadata key: Triton's gRPC server expects the flag's header name behind this prefix."""
RESTRICTED_APIS: tuple[str, ...] = ("model-repository", "model-config", "shared-memory", "trace", "logging")
"""Triton API groups that need the key. model-repository: index, load (runs code), unload (an outage);
model-config: the deployed configs; shared-memory: registering regions of this host's memory;
trace and logging: server-wide settings. None of them is needed to run inference."""
KEY_FILE = Path(".fluxserve") / "triton_control_key"
"""Relative to the project folder; `make up` creates it once."""
MIN_KEY_CHARS = 24
_KEY_CHARS = re.compile(r"[A-Za-z0-9_-]+")
"""Triton's flag is `<groups>:<header>=<key>`: a key of URL-safe characters cannot be misparsed."""


class ControlKeyError(SecretConfigError):
    """No usable control key: the message names the variable or file to fix (never the key)."""


class ControlKeySettings(BaseSettings):
    """Environment prefix: FLUXSERVE_TRITON_ (shared with runtime.launcher.TritonSettings)."""

    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_TRITON_", extra="ignore")

    control_key: SecretStr | None = None
    control_key_file: Path = PROJECT_ROOT / KEY_FILE


def check_key(key: str, source: str) -> str:
    """`key` if it is long and random-looking enough for Triton's flag (and no placeholder:
    common.secret_strength), else ControlKeyError."""
    problem = secret_problem(key, MIN_KEY_CHARS)
    if problem is None and not _KEY_CHARS.fullmatch(key):
        problem = "it has characters other than A-Z a-z 0-9 _ -"
    if problem is not None:
        raise ControlKeyError(
            f"{source}: the Triton control key is unusable: {problem}; it needs at least {MIN_KEY_CHARS} "
            "random characters of A-Z a-z 0-9 _ - (make one with: python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')"
        )
    return key


def _read_key_file(path: Path) -> str:
    try:
        text = read_private_file(path)
    except SecretConfigError as e:  # one exception type for callers: every control-key problem
        raise ControlKeyError(str(e)) from None
    return check_key(text.strip(), str(path))


def control_key(settings: ControlKeySettings | None = None) -> str | None:
    """The configured key (the setting, else the key file), or None when neither exists."""
    settings = settings or ControlKeySettings()
    if settings.control_key is not None and settings.control_key.get_secret_value().strip():
        return check_key(settings.control_key.get_secret_value().strip(), "FLUXSERVE_TRITON_CONTROL_KEY")
    if settings.control_key_file.is_file():
        return _read_key_file(settings.control_key_file)
    return None


def ensure_control_key(settings: ControlKeySettings | None = None) -> str:
    """The configured key; without one, a new random key written to the key file once (O_EXCL,
    mode 0600 in a 0700 folder), so every process of `make up` finds the same key."""
    settings = settings or ControlKeySettings()
    key = control_key(settings)
    if key is not None:
        return key
    path = settings.control_key_file
    try:
        created = create_secret_file(path)  # when another process created it meanwhile: theirs
    except OSError as e:
        raise ControlKeyError(f"cannot create {path} ({e.strerror}): set FLUXSERVE_TRITON_CONTROL_KEY") from e
    if created:
        log.info("created the Triton control key in %s", path)
    return _read_key_file(path)


def control_headers(settings: ControlKeySettings | None = None, grpc: bool = False) -> dict[str, str]:
    """HTTP headers (or with `grpc`, gRPC metadata) for a model-control or model-config call; empty
    when no key is configured (Triton then refuses the call, naming the header it expects)."""
    key = control_key(settings)
    return {GRPC_CONTROL_KEY_HEADER if grpc else CONTROL_KEY_HEADER: key} if key else {}


def restricted_api_flags(key: str) -> list[str]:
    """tritonserver arguments that put RESTRICTED_APIS behind the key on HTTP and gRPC."""
    spec = f"{','.join(RESTRICTED_APIS)}:{CONTROL_KEY_HEADER}={key}"
    return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]


def main() -> int:
    """`python -m client.control_key`: print the restricted-API flags for the configured key, for an
    image whose command starts tritonserver itself (deploy/docker/Dockerfile.gpu); exit 1 without a
    usable key, so that such a server is never started open."""
    import sys

    try:
        key = control_key()
    except ControlKeyError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    if key is None:
        sys.stderr.write("set FLUXSERVE_TRITON_CONTROL_KEY: Triton's model control must not run open\n")
        return 1
    sys.stdout.write(" ".join(restricted_api_flags(key)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
