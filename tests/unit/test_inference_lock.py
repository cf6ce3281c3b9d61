"""FLUXSERVE_API_REQUIRE_KEY_FOR_INFERENCE locks every route that runs a model (issue 25's first
check): /classify, /generate and /chat, JSON and SSE, answer 401 to an anonymous caller before any
model runs, and serve a caller with the operator key. In-process, against a fake Triton client."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from api.app import create_app
from api.readiness import Readiness
from api.settings import ApiSettings
from tests.unit.test_public_errors import KEY, FakeTriton

SSE = {"Accept": "text/event-stream"}
SMALL = {"width": 64, "height": 64, "steps": 1}
ROUTES = [
    ("/classify", {"text": "can I see you in the kitchen?"}, {}),
    ("/generate", {"prompt": "a red fox", **SMALL}, {}),
    ("/generate", {"prompt": "a red fox", **SMALL}, SSE),
    ("/chat", {"message": "make an image of a red fox", "generate": SMALL}, {}),
    ("/chat", {"message": "make an image of a red fox", "generate": SMALL}, SSE),
]


class CountingTriton(FakeTriton):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def classify(self, texts):
        self.calls += 1
        return await super().classify(texts)

    async def generate(self, *args):
        self.calls += 1
        return await super().generate(*args)

    async def generate_stream(self, *args):
        self.calls += 1
        async for item in super().generate_stream(*args):
            yield item


@pytest.mark.parametrize(
    ("path", "body", "headers"), ROUTES, ids=[f"{p} {'sse' if h else 'json'}" for p, _, h in ROUTES]
)
def test_locked_inference_needs_the_key(tmp_path, monkeypatch, path: str, body: dict, headers: dict) -> None:
    monkeypatch.setenv("FLUXSERVE_JOBS_JOBS_DIR", str(tmp_path / "jobs"))
    settings = ApiSettings(
        keys=f"tests:{KEY}",
        key_file=tmp_path / "no-key-file",
        classify_calls_inflight=0,
        triton_metrics_url=None,
        require_key_for_inference=True,
    )

    async def main() -> tuple[httpx.Response, int, httpx.Response]:
        app = create_app(settings)
        state = app.state.fluxserve
        async with app.router.lifespan_context(app):
            for client in (state.triton, state.triton_generate):
                await client.close()
            fake = CountingTriton()
            state.triton = state.triton_generate = fake
            state.readiness = Readiness(fake, settings.ready_probe_interval_s)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
                anonymous = await http.post(path, json=body, headers=headers)
                calls = fake.calls
                keyed = await http.post(path, json=body, headers={**headers, "Authorization": f"Bearer {KEY}"})
        return anonymous, calls, keyed

    anonymous, calls_before_key, keyed = asyncio.run(main())
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.headers["www-authenticate"] == "Bearer" and calls_before_key == 0
    assert keyed.status_code == 200, keyed.text
