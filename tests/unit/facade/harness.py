"""The facade in-process: api.app.create_app with a fake Triton client, its lifespan run, driven
by httpx.AsyncClient over httpx.ASGITransport. No process, no socket, no port: milliseconds.

    async with running_facade(FakeTriton(), require_key_for_inference=True) as f:
        r = await f.http.post("/classify", json={"text": "hi"})     # sends the operator key
        r = await f.anon.post("/classify", json={"text": "hi"})     # sends none

The tests' conftest.py points the job store at a temporary folder first (create_app reads
FLUXSERVE_JOBS_ from the environment).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from api.app import create_app
from api.settings import ApiSettings
from api.state import AppState
from api.triton_port import TritonFactory
from tests.unit.facade.fake_triton import FakeTriton, fake_factory

KEY = "test-" + secrets.token_urlsafe(24)
"""The operator key the in-process facades accept (as FLUXSERVE_API_KEYS `tests:<key>`)."""
KEY_NAME = "tests"
BASE_URL = "http://127.0.0.1"
SSE = {"Accept": "text/event-stream"}


@dataclass
class Facade:
    app: FastAPI
    fake: FakeTriton
    http: httpx.AsyncClient
    """Sends the operator key."""
    anon: httpx.AsyncClient
    """Sends no key."""

    @property
    def state(self) -> AppState:
        return self.app.state.fluxserve

    def client(self, client: tuple[str, int] = ("127.0.0.1", 40000), **kwargs: Any) -> httpx.AsyncClient:
        """Another client (the caller closes it): e.g. from another address, or with other headers."""
        transport = httpx.ASGITransport(app=self.app, client=client)
        return httpx.AsyncClient(transport=transport, base_url=kwargs.pop("base_url", BASE_URL), **kwargs)


def facade_settings(**changes: Any) -> ApiSettings:
    """The settings of a facade under test: the test key, no key file, no Triton metrics to read."""
    base: dict[str, Any] = {
        "keys": f"{KEY_NAME}:{KEY}",
        "key_file": "/nonexistent/fluxserve-key",
        "triton_metrics_url": None,
    }
    return ApiSettings(**{**base, **changes})


@asynccontextmanager
async def running_facade(
    fake: FakeTriton | None = None, triton: TritonFactory | None = None, **settings_changes: Any
) -> AsyncIterator[Facade]:
    """A facade whose Triton is `fake`, lifespan started, with a keyed and an anonymous client.
    `triton` replaces the fake's factory (the real AsyncTritonClient, say, at a port where nothing
    listens); `fake` is then only the harness's record."""
    fake = fake if fake is not None else FakeTriton()
    app = create_app(facade_settings(**settings_changes), triton=triton or fake_factory(fake))
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        keyed = {"Authorization": f"Bearer {KEY}"}
        http = await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url=BASE_URL, headers=keyed))
        anon = await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url=BASE_URL))
        yield Facade(app, fake, http, anon)


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event, data) pairs of a whole server-sent event stream, data parsed as JSON."""
    events: list[tuple[str, dict]] = []
    name, data = "message", []
    for line in [*text.splitlines(), ""]:
        if line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").lstrip())
        elif line == "" and data:
            events.append((name, json.loads("\n".join(data))))
            name, data = "message", []
    return events
