"""The Host header allow-list: the facade answers only requests addressed to a name it serves.

Binding loopback keeps other machines out, but not a web page: a page on `evil.example` whose DNS
name is re-pointed at 127.0.0.1 (DNS rebinding) makes the visitor's browser send requests to the
facade that the browser considers same-origin, so the page can read the answers. Those requests
still carry `Host: evil.example`; refusing every Host outside the allow-list (loopback names by
default, FLUXSERVE_API_ALLOWED_HOSTS to serve others) closes that door. A plain ASGI middleware, like
api.metrics, answering in the facade's error envelope before routing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import send_error

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
ANY_HOST = "*"
"""An allow-list entry that switches the check off (behind a proxy that checks Host itself)."""
_WILDCARD_BINDS = ("", "0.0.0.0", "::", "[::]")
_SHOWN_CHARS = 64
_PORT_RE = re.compile(r"(?::[0-9]{0,5})?")


def host_name(header: str) -> str | None:
    """The name in a Host header, lower-cased and without its port; None when malformed.

    `[::1]:8080` -> `[::1]`, `LocalHost:80` -> `localhost`; an IPv6 address must be bracketed."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 2:
            return None
        name, port = value[: end + 1], value[end + 1 :]
    else:
        name, sep, port = value.partition(":")
        port = sep + port
    if not name or not _PORT_RE.fullmatch(port):
        return None
    return name


def normalise_allowed(names: Iterable[str]) -> frozenset[str]:
    """Allow-list entries as `host_name` returns them (a bare IPv6 address gets its brackets)."""
    out = set()
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name != ANY_HOST and ":" in name and not name.startswith("["):
            name = f"[{name}]"
        out.add(name)
    return frozenset(out)


def allowed_hosts(configured: Iterable[str], bind_host: str) -> frozenset[str]:
    """The configured names, plus the address the facade binds when that is one address (a facade
    bound to 10.0.0.5 is reached as 10.0.0.5)."""
    extra = () if bind_host.strip() in _WILDCARD_BINDS else (bind_host,)
    return normalise_allowed((*configured, *extra))


class HostCheckMiddleware:
    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed
        self.any = ANY_HOST in allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"host"), None)
        if header is None:
            await send_error(send, 400, "invalid_host", "a Host header is required")
            return
        name = host_name(header.decode("latin-1"))
        if name is None or name not in self.allowed:
            shown = (name or header.decode("latin-1"))[:_SHOWN_CHARS]
            message = f"host {shown!r} is not served here (FLUXSERVE_API_ALLOWED_HOSTS lists the names that are)"
            await send_error(send, 400, "invalid_host", message)
            return
        await self.app(scope, receive, send)
