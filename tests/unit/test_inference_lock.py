"""FLUXSERVE_API_REQUIRE_KEY_FOR_INFERENCE locks every route that runs a model (issue 25's first
check): /classify, /generate and /chat, JSON and SSE, answer 401 to an anonymous caller before any
model runs, and serve a caller with the operator key. In-process, against a fake Triton client."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.test_public_errors import FakeTriton, run_facade

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
    out: dict[str, object] = {}

    async def scenario(http: httpx.AsyncClient, fake: CountingTriton, _state) -> None:
        key = http.headers.pop("Authorization")  # the harness's client sends the key: not this time
        out["anonymous"] = await http.post(path, json=body, headers=headers)
        out["calls_before_key"] = fake.calls
        out["keyed"] = await http.post(path, json=body, headers={**headers, "Authorization": key})

    run_facade(tmp_path, monkeypatch, scenario, CountingTriton, require_key_for_inference=True)
    anonymous, keyed = out["anonymous"], out["keyed"]
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.headers["www-authenticate"] == "Bearer" and out["calls_before_key"] == 0
    assert keyed.status_code == 200, keyed.text
