"""Bounds on slow and many clients, in the HTTP protocol itself (issue 26, item 3).

uvicorn reads headers and bodies for as long as a client cares to send them and accepts every
connection: a few thousand connections that trickle one byte every few seconds (slowloris) hold
the facade's sockets and file descriptors forever. `guarded_protocol` subclasses uvicorn's
httptools protocol (the one `make up` runs) with three limits:

* a request's headers must be complete within `header_timeout_s` of its first byte, or of the
  connection's opening when nothing was sent yet; else the connection is closed, with no answer
  (the client has not finished asking anything);
* a body must arrive within `body_timeout_s` plus its declared length at `body_min_bytes_per_s`
  (a 200 MB upload gets its time; a trickle does not); else the connection is closed and the
  handler waiting for the body sees a disconnect;
* at most `max_connections` open at once: one more is closed as soon as it is accepted (the
  client sees its connection reset, and can retry), so descriptors cannot run out.

Idle keep-alive connections between requests are uvicorn's own `timeout_keep_alive` (5 s).
Only uvicorn's documented protocol hooks are overridden; tests/unit/test_slow_clients.py starts a
real uvicorn with it, so an incompatible uvicorn fails there.
"""

from __future__ import annotations

import asyncio
import logging
import resource

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class _Limits:
    def __init__(
        self, header_timeout_s: float, body_timeout_s: float, body_min_bytes_per_s: float, max_connections: int
    ) -> None:
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        self.body_min_bytes_per_s, self.max_connections = body_min_bytes_per_s, max_connections
        self.closed_slow = 0
        self.refused_connections = 0


def guarded_protocol(
    header_timeout_s: float, body_timeout_s: float, body_min_bytes_per_s: float, max_connections: int
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the limits above (pass it as `uvicorn.Config(http=...)`)."""
    limits = _Limits(header_timeout_s, body_timeout_s, body_min_bytes_per_s, max_connections)

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        guard = limits
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                limits.refused_connections += 1
                if limits.refused_connections % 1000 == 1:  # a burst is one line, not thousands
                    log.warning("over %d connections: closing new ones", limits.max_connections)
                transport.close()
                return
            self._arm(limits.header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm(limits.header_timeout_s)  # the next request on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()
            length = self._content_length()
            if length or self._chunked():
                # A chunked body declares no length: it gets the base time only.
                self._arm(limits.body_timeout_s + length / limits.body_min_bytes_per_s)

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def _content_length(self) -> int:
            for name, value in self.headers:
                if name == b"content-length":
                    try:
                        return max(0, int(value))
                    except ValueError:
                        return 0
            return 0

        def _chunked(self) -> bool:
            return any(n == b"transfer-encoding" and b"chunked" in v.lower() for n, v in self.headers)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                limits.closed_slow += 1
                self.transport.close()

    return GuardedHttpToolsProtocol


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files towards `wanted` (at most the hard limit):
    `max_connections` means nothing when accept() fails first. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
