"""Slowloris against the real facade as `make up` runs it (issue 26, item 3): 1,500 connections
that trickle one header byte every few seconds neither block other clients nor stay open."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = pytest.mark.integration

SLOW_CONNECTIONS = 1500
TRICKLE_EVERY_S = 5.0


async def _slow_client(host: str, port: int, opened: list[int], closed: list[int], stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    opened.append(1)
    try:
        request = b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        for byte in request:
            writer.write(bytes([byte]))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TRICKLE_EVERY_S):
                    if await reader.read(1) == b"" or stop.is_set():
                        break  # the server closed it (EOF)
            if stop.is_set() or writer.is_closing():
                break
        else:
            return
        closed.append(1)
    except ConnectionError:
        closed.append(1)
    finally:
        writer.close()


async def _scenario(url: str) -> dict[str, float]:
    parts = urlsplit(url)
    opened: list[int] = []
    closed: list[int] = []
    stop = asyncio.Event()
    clients = [
        asyncio.create_task(_slow_client(parts.hostname, parts.port, opened, closed, stop))
        for _ in range(SLOW_CONNECTIONS)
    ]
    while len(opened) < SLOW_CONNECTIONS:
        await asyncio.sleep(0.05)
    # Everyone else, meanwhile: answered within a second.
    async with httpx.AsyncClient(base_url=url, timeout=1.0) as http:
        health = await http.get("/healthz")
        classify = await http.post("/classify", json={"text": "can I see you in the kitchen?"})
    open_when_answered = SLOW_CONNECTIONS - len(closed)
    async with asyncio.timeout(60):
        while len(closed) < 0.9 * SLOW_CONNECTIONS:
            await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*clients, return_exceptions=True)
    return {
        "health": health.status_code,
        "classify": classify.status_code,
        "open_when_answered": open_when_answered,
        "closed": len(closed),
    }


def test_slowloris_neither_blocks_nor_stays(facade) -> None:
    out = asyncio.run(_scenario(facade.url))
    assert out["health"] == 200 and out["classify"] == 200
    assert out["open_when_answered"] > 0.9 * SLOW_CONNECTIONS  # they really were open meanwhile
    assert out["closed"] >= 0.9 * SLOW_CONNECTIONS
