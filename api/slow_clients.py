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

The protocol also makes the facade's early refusals (issue 24), given a `Shedder`
(api/shedding.py): when a POST to a shed route arrives and the shedder refuses it, the 503 is
written here, from bytes built once, as soon as the headers are in: no ASGI scope, no task, no
middleware, no body read (what of it arrives is dropped; the connection stays usable). Under a
storm, refusals are most of what the event loop does, and through uvicorn's request cycle and the
app's layers they cost more than twice as much (docs/benchmarks.md, "Under overload"). A request
pipelined behind one still in flight takes the usual path (its answer must wait its turn), where
EarlyShed makes the same decision.
Only uvicorn's documented protocol hooks are overridden; tests/unit/test_slow_clients.py starts a
real uvicorn with it, so an incompatible uvicorn fails there.
"""

from __future__ import annotations

import asyncio
import logging
import resource

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.admission import ENTRY, Entry
from api.shedding import MIN_HOLD_S, Shedder

log = logging.getLogger(__name__)


class _Limits:
    def __init__(
        self, header_timeout_s: float, body_timeout_s: float, body_min_bytes_per_s: float, max_connections: int
    ) -> None:
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        self.body_min_bytes_per_s, self.max_connections = body_min_bytes_per_s, max_connections
        self.closed_slow = 0
        self.refused_connections = 0
        self.refusal_head: tuple[list[tuple[bytes, bytes]], bytes] | None = None
        """(uvicorn's default-headers list, the refusal's status line and those headers)."""


class _Refusal:
    """Stands in for uvicorn's request cycle while a refusal is held or written: the protocol's
    callbacks find what they look for, and the request's body is dropped as it arrives."""

    __slots__ = ("response_complete", "keep_alive", "disconnected", "more_body")

    class _NoEvent:
        def set(self) -> None:
            pass

    message_event = _NoEvent()

    def __init__(self, keep_alive: bool) -> None:
        self.response_complete, self.keep_alive, self.disconnected, self.more_body = False, keep_alive, False, True

    @property
    def body(self) -> bytes:
        return b""

    @body.setter
    def body(self, _: bytes) -> None:
        pass


STATUS_LINE = b"HTTP/1.1 503 Service Unavailable\r\n"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """The protocol; `guarded_protocol` makes a subclass with its own `guard` and `shedder`."""

    guard: _Limits
    shedder: Shedder | None = None
    _deadline: asyncio.TimerHandle | None = None
    _entry: Entry | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.guard.max_connections:
            self.guard.refused_connections += 1
            if self.guard.refused_connections % 1000 == 1:  # a burst is one line, not thousands
                log.warning("over %d connections: closing new ones", self.guard.max_connections)
            transport.close()
            return
        self._arm(self.guard.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._leave()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._leave()
        super().on_response_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._entry is not None and self.cycle.more_body:
            # The room is for the moment between the door and the handler. A request whose body
            # is still to come gives it back: clients that trickle their bodies (or wait for
            # 100-continue) must not keep others out for the body's whole allowance.
            self._leave()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.guard.header_timeout_s)  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._disarm()
        if self.shedder is not None and (self.cycle is None or self.cycle.response_complete):
            method = self.parser.get_method().decode("latin-1")
            path = self.url.split(b"?", 1)[0].decode("latin-1")
            if self._refused(method, path):
                return
            self._enter(method, path)
        else:
            super().on_headers_complete()
        length = self._content_length()
        if length or self._chunked():
            # A chunked body declares no length: it gets the base time only.
            self._arm(self.guard.body_timeout_s + length / self.guard.body_min_bytes_per_s)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()
        if isinstance(self.cycle, _Refusal) and self.cycle.response_complete:
            # The body ended after its refusal was written, which stopped uvicorn's keep-alive
            # timer: the next request's headers get the usual time, else the connection closes.
            self._arm(self.guard.header_timeout_s)

    def _refused(self, method: str, path: str) -> bool:
        """Refuse this request now if the shedder says so (True), writing the 503 at once or
        after the pacer's hold; False: it goes on to the app."""
        shedder = self.shedder
        assert shedder is not None
        queue = shedder.refusing(method, path)
        if queue is None:
            return False
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        refusal = self.cycle = _Refusal(keep_alive)  # type: ignore[assignment]
        answer = shedder.answer(path, queue)[2]
        hold = shedder.pacer.begin(self.client, shedder.lag_s())
        if hold is not None and hold >= MIN_HOLD_S:
            self.loop.call_later(hold, self._answer_refusal, refusal, answer, hold)
        else:
            self._answer_refusal(refusal, answer, hold)
        return True

    def _enter(self, method: str, path: str) -> None:
        """Let the request in, holding its room until its handler admits it: the task uvicorn
        creates for it inherits ENTRY (api.admission.Entry)."""
        assert self.shedder is not None
        entry = self._entry = self.shedder.entry(method, path)
        token = ENTRY.set(entry)
        try:
            super().on_headers_complete()
        finally:
            ENTRY.reset(token)

    def _leave(self) -> None:
        if self._entry is not None:
            self._entry.close()
            self._entry = None

    def _answer_refusal(self, refusal: _Refusal, answer: bytes, hold: float | None) -> None:
        shedder = self.shedder
        assert shedder is not None
        shedder.pacer.end(self.client, hold)
        if self.transport.is_closing():  # the client left during the hold
            return
        refusal.response_complete = True
        close = b"" if refusal.keep_alive else b"connection: close\r\n"
        self.transport.write(self._status_and_defaults() + close + answer)
        if refusal.keep_alive:
            self.on_response_complete()  # uvicorn's own: pipelined requests, the keep-alive timer
        else:
            self.transport.close()

    def _status_and_defaults(self) -> bytes:
        """The status line and the server's default headers (date, server), built again only when
        uvicorn replaces that list (once a second, for the date), not per refusal."""
        defaults = self.server_state.default_headers
        cached = self.guard.refusal_head
        if cached is None or cached[0] is not defaults:
            head = STATUS_LINE + b"".join(name + b": " + value + b"\r\n" for name, value in defaults)
            cached = self.guard.refusal_head = (defaults, head)
        return cached[1]

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
            self.guard.closed_slow += 1
            self.transport.close()


def guarded_protocol(
    header_timeout_s: float,
    body_timeout_s: float,
    body_min_bytes_per_s: float,
    max_connections: int,
    shedder: Shedder | None = None,
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the limits above, and the early refusals of `shedder`
    when given (pass it as `uvicorn.Config(http=...)`): a class of its own, so that each server's
    counters are its own."""
    guard = _Limits(header_timeout_s, body_timeout_s, body_min_bytes_per_s, max_connections)
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"guard": guard, "shedder": shedder})


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files towards `wanted` (at most the hard limit):
    `max_connections` means nothing when accept() fails first. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
