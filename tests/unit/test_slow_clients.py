"""Slow and many clients against a real uvicorn running the facade's protocol (api/slow_clients.py)."""

from __future__ import annotations

import asyncio

from api.slow_clients import guarded_protocol
from tests.conftest import uvicorn_serving


async def _app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = b"got %d" % len(body)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})


async def _closed(reader: asyncio.StreamReader, within_s: float) -> bool:
    """True when the server closes the connection (EOF) within `within_s`."""
    try:
        async with asyncio.timeout(within_s):
            return await reader.read() == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def _scenario() -> dict[str, object]:
    protocol = guarded_protocol(header_timeout_s=0.3, body_timeout_s=0.3, body_min_bytes_per_s=1e6, max_connections=4)
    out: dict[str, object] = {}
    async with uvicorn_serving(_app, protocol) as port:
        # Headers trickled and never finished: closed, without an answer.
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(b"POST /x HTTP/1.1\r\nHost: a\r\n")
        # Connected, nothing sent: closed too.
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        # A body that never arrives in full.
        r3, w3 = await asyncio.open_connection("127.0.0.1", port)
        w3.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nabc")
        # A prompt client on a fourth connection is served, and kept alive.
        r4, w4 = await asyncio.open_connection("127.0.0.1", port)
        w4.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
        out["served"] = await r4.readuntil(b"got 3")
        # A fifth connection is over the limit of 4: closed at once.
        r5, w5 = await asyncio.open_connection("127.0.0.1", port)
        out["over_limit_closed"] = await _closed(r5, 0.2)
        out["header_closed"], out["idle_closed"], out["body_closed"] = await asyncio.gather(
            _closed(r1, 5.0), _closed(r2, 5.0), _closed(r3, 5.0)
        )
        # With the slow ones gone there is room again, and a complete request is still answered.
        r6, w6 = await asyncio.open_connection("127.0.0.1", port)
        w6.write(b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n")
        out["after"] = await r6.readuntil(b"got 0")
        out["guard"] = (protocol.guard.closed_slow, protocol.guard.refused_connections)
        for w in (w1, w2, w3, w4, w5, w6):  # held until here: a dropped writer closes its socket
            w.close()
    return out


def test_slow_clients_are_closed_and_connections_capped() -> None:
    out = asyncio.run(_scenario())
    assert out["served"].endswith(b"got 3") and out["after"].endswith(b"got 0")
    assert out["header_closed"] and out["idle_closed"] and out["body_closed"]
    assert out["over_limit_closed"]
    assert out["guard"] == (3, 1)
