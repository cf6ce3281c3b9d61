"""A lean HTTP/1.1 client for open-loop overload: keep-alive connections, responses parsed in C.

`fluxserve-bench overload` offers /classify at up to 10x its capacity, thousands of requests per
second, from the same 2 cores as the servers. aiohttp spends a few hundred microseconds of Python
per request, so at that rate the load generator needed more CPU than the machine has and measured
itself (its own lateness ran into seconds). Here a request is one pre-built bytes object written to
an idle keep-alive connection, and the response is parsed by httptools (the C parser uvicorn uses):
tens of microseconds per request, so the server, not the generator, is what saturates.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.response = Response(0)
        self.closed = False
        self._header: bytes = b""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as e:  # a malformed response ends this connection
            self._fail(ConnectionError(f"bad response: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError("server closed the connection"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.response.body += body

    def on_message_complete(self) -> None:
        self.response.status = self.parser.get_status_code()
        if not self.parser.should_keep_alive():
            self.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self.response)

    def send(self, request: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None and self.waiter is None
        self.response = Response(0)
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class FastHttpPool:
    """At most `max_connections` keep-alive connections to one host; a request waits for an idle
    one when all are busy (that wait is part of its measured latency)."""

    def __init__(self, host: str, port: int, max_connections: int = 256) -> None:
        self.host, self.port, self.max_connections = host, port, max_connections
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open = 0
        self._freed = asyncio.Condition()

    @classmethod
    def for_url(cls, url: str, max_connections: int = 256) -> FastHttpPool:
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        return cls(host, int(port), max_connections)

    def post_bytes(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        """The whole request, built once (the caller may cache it)."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("latin-1") + body

    async def request(self, raw: bytes, timeout_s: float) -> Response:
        """Send a pre-built request; TimeoutError after `timeout_s` (counted from now, waiting for a
        connection included), ConnectionError when the connection fails."""
        async with asyncio.timeout(timeout_s):
            conn = await self._acquire()
            try:
                response = await conn.send(raw)
            except BaseException:
                conn.close()  # a half-read response cannot be resumed
                await self._release(conn)
                raise
        await self._release(conn)
        return response

    async def warm(self, n: int) -> None:
        """Open connections until `n` (at most `max_connections`) are open, all idle. Reused
        oldest-idle first, they spread an open loop's arrivals over `n` clients, each sending one
        request every n / rate seconds, instead of over the few a lazily grown pool would hold,
        each reused the moment it frees (which the facade rightly treats as a client retrying at
        once, api/shedding.py)."""
        loop = asyncio.get_running_loop()
        alive = [c for c in self._idle if not c.closed]  # the server closes idle ones after its keep-alive
        self._open -= len(self._idle) - len(alive)
        self._idle = collections.deque(alive)
        missing = max(0, min(n, self.max_connections) - self._open)
        self._open += missing
        results = await asyncio.gather(
            *(loop.create_connection(_Connection, self.host, self.port) for _ in range(missing)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                self._open -= 1
            else:
                self._idle.append(result[1])

    async def _acquire(self) -> _Connection:
        while True:
            while self._idle:
                conn = self._idle.popleft()
                if not conn.closed:
                    return conn
                self._open -= 1
            if self._open < self.max_connections:
                self._open += 1
                try:
                    _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
                except BaseException:
                    self._open -= 1
                    raise
                return conn
            async with self._freed:
                await self._freed.wait()

    async def _release(self, conn: _Connection) -> None:
        if conn.closed:
            self._open -= 1
        else:
            self._idle.append(conn)
        async with self._freed:
            self._freed.notify()

    async def close(self) -> None:
        while self._idle:
            self._idle.popleft().close()
        self._open = 0
