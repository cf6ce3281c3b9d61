"""The overload benchmark's lean HTTP client against a real (tiny asyncio) HTTP server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from benchmarks.fast_http import FastHttpPool


async def _serve(handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return await reader.readexactly(length)


def _keep_alive(respond: Callable[[bytes, int], bytes], connections: list[asyncio.StreamWriter]):
    """A handler that answers every request of a connection with `respond(body, connection number)`
    until the client goes; each connection's writer is appended to `connections`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(connections)
        connections.append(writer)
        try:
            while True:
                writer.write(respond(await _read_request(reader), number))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return handler


def test_keep_alive_requests_reuse_one_connection_and_read_status_headers_body() -> None:
    connections: list[asyncio.StreamWriter] = []

    def respond(body: bytes, _: int) -> bytes:
        status = b"503 Service Unavailable\r\nRetry-After: 2" if body == b"busy" else b"200 OK"
        return b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    async def main() -> None:
        server, port = await _serve(_keep_alive(respond, connections))
        pool = FastHttpPool("127.0.0.1", port, max_connections=1)
        for body in (b'{"a": 1}', b"busy", b"x" * 100_000):
            r = await pool.request(pool.post_bytes("/classify", body), timeout_s=10)
            assert r.body == body
            assert r.status == (503 if body == b"busy" else 200)
        assert r.status == 200 and (await pool.request(pool.post_bytes("/", b"busy"), 10)).headers["retry-after"] == "2"
        assert len(connections) == 1
        await pool.close()
        server.close()

    asyncio.run(main())


def test_a_dropped_connection_and_a_silent_server_fail_that_request_only() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await _read_request(reader)
        if body == b"drop":
            writer.close()
            return
        if body == b"hang":
            await asyncio.sleep(5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, port = await _serve(handler)
        pool = FastHttpPool("127.0.0.1", port, max_connections=2)
        with pytest.raises(ConnectionError):
            await pool.request(pool.post_bytes("/", b"drop"), timeout_s=10)
        with pytest.raises(TimeoutError):
            await pool.request(pool.post_bytes("/", b"hang"), timeout_s=0.2)
        r = await pool.request(pool.post_bytes("/", b"fine"), timeout_s=10)  # a new connection: Connection: close
        assert (r.status, r.body) == (200, b"ok")
        assert pool._open == 0  # every connection was closed and accounted for
        await pool.close()
        server.close()

    asyncio.run(main())


def test_warm_opens_connections_up_front_and_requests_take_the_oldest_idle_first() -> None:
    """An open loop's arrivals spread over every warmed connection in turn (independent clients,
    none reused the moment it frees); one the server closed while idle is replaced, not counted."""
    served_on: list[int] = []
    writers: list[asyncio.StreamWriter] = []

    def respond(_: bytes, number: int) -> bytes:
        served_on.append(number)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> None:
        server, port = await _serve(_keep_alive(respond, writers))
        pool = FastHttpPool("127.0.0.1", port, max_connections=3)
        await pool.warm(5)  # capped at max_connections
        for _ in range(6):
            assert (await pool.request(pool.post_bytes("/", b"x"), timeout_s=10)).status == 200
        assert len(writers) == 3
        assert served_on == [served_on[0], served_on[1], served_on[2]] * 2 and len(set(served_on)) == 3
        writers[served_on[0]].close()  # the server drops the next one in line while it is idle
        async with asyncio.timeout(5):  # the client sees the close on its next loop turns
            while not pool._idle[0].closed:
                await asyncio.sleep(0.01)
        await pool.warm(3)
        assert len(writers) == 4 and pool._open == 3
        await pool.close()
        server.close()

    asyncio.run(main())
