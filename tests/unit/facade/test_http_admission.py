"""Admission answers that need no real timing, in-process against a fake Triton whose calls are
held on an event (tests/unit/facade/fake_triton.py): requests arrive one after another, each
either refused or admitted (seen arriving at the fake) before the next is sent, so the outcome is
the admission rule's, not the machine's speed. Moved here from tests/integration/test_reliability
(the oversized request, the overload burst and the early shed), which ran them against a facade
process in front of a real Triton."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from common.paths import MODEL_REPOSITORY
from tests.unit.facade.fake_triton import FakeTriton, served_configs
from tests.unit.facade.harness import Facade, running_facade

pytestmark = pytest.mark.anyio

PROMPT = "a red fox in snow"
LONG = {"prompt": PROMPT, "width": 256, "height": 256, "steps": 100, "seed": 1}


async def arrive(f: Facade, kind: str, send: Callable[[], Awaitable[httpx.Response]]) -> asyncio.Task:
    """Send one request and wait until it is answered or its call has reached the fake."""
    entered_before = f.fake.entered(kind)
    request = asyncio.create_task(send())
    entered = asyncio.create_task(f.fake.wait_entered(kind, entered_before + 1))
    await asyncio.wait({request, entered}, return_when=asyncio.FIRST_COMPLETED, timeout=30)
    entered.cancel()
    assert request.done() or f.fake.entered(kind) > entered_before, "neither answered nor admitted"
    return request


def assert_shed(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "unavailable"


async def test_oversized_request_never_reaches_a_model() -> None:
    """Issue 15's OOM request (2000x1920, 47 steps, 2 images) is refused with the limit; so is a
    request within the cost limit whose one image is over what a `generate` instance may use (the
    deployed model's facts: its shape, memory share and instances, from the built repository)."""
    fake = FakeTriton(configs=served_configs(MODEL_REPOSITORY))
    async with running_facade(fake) as f:
        r = await f.http.post(
            "/generate", json={"prompt": PROMPT, "width": 2000, "height": 1920, "steps": 47, "num_images": 2}
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["type"] == "invalid_request" and "limit" in r.json()["error"]["message"]
        r = await f.http.post("/generate", json={"prompt": PROMPT, "width": 2048, "height": 2048, "steps": 1})
        assert r.status_code == 422, r.text
        assert "transformer memory" in r.json()["error"]["message"] and "limit of" in r.json()["error"]["message"]
    assert fake.calls["generate"] == 0 and fake.calls["generate_stream"] == 0


@pytest.fixture
def overload_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXSERVE_ADMISSION_GENERATE_MAX_WAIT_S", "1")
    monkeypatch.setenv("FLUXSERVE_ADMISSION_CLASSIFY_MAX_WAIT_S", "0.2")
    monkeypatch.setenv("FLUXSERVE_ADMISSION_CLASSIFY_INITIAL_RATE_TEXTS", "20")


@pytest.fixture
async def overloaded(overload_env: None) -> AsyncIterator[Facade]:
    async with running_facade() as f:
        yield f


@pytest.mark.parametrize("route", ["generate", "classify"])
async def test_overload_sheds_with_retry_after(overloaded: Facade, route: str) -> None:
    """A burst far beyond capacity while nothing finishes: the first requests are admitted, the
    rest refused at once with 503 + Retry-After; the admitted ones then complete."""
    f = overloaded
    f.fake.hold(route)

    def send(i: int) -> Callable[[], Awaitable[httpx.Response]]:
        async def one() -> httpx.Response:
            # Each from its own connection: independent arrivals, not one client retrying at once.
            async with f.client(client=("127.0.0.1", 50000 + i), headers=f.http.headers, timeout=60) as http:
                if route == "generate":
                    body = {"prompt": PROMPT, "width": 128, "height": 128, "steps": 8, "seed": i}
                    return await http.post("/generate", json=body)
                return await http.post("/classify", json={"texts": [f"send me a picture {i}-{k}" for k in range(64)]})

        return one

    requests = [await arrive(f, route, send(i)) for i in range(24)]
    refused = [t.result() for t in requests if t.done()]
    admitted = [t for t in requests if not t.done()]
    assert refused and admitted, (len(refused), len(admitted))
    for r in refused:
        assert_shed(r)
    f.fake.release(route)
    assert [r.status_code for r in await asyncio.gather(*admitted)] == [200] * len(admitted)


class CountedBody:
    """A request body that records whether the server pulled any of it."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pulled = data, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.pulled += 1
        yield self.data


async def test_saturated_route_sheds_before_reading_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a generation holding more than the maximum wait, the next /generate is refused by the
    early shed (api/shedding.py) without its body being read: a body that is not even JSON gets
    503 + Retry-After, not the 422 that parsing it would give. /classify is not affected."""
    monkeypatch.setenv("FLUXSERVE_ADMISSION_GENERATE_MAX_WAIT_S", "0.5")
    monkeypatch.setenv("FLUXSERVE_ADMISSION_GENERATE_INITIAL_RATE_MPS", "0.01")
    async with running_facade() as f:
        f.fake.hold("generate")
        held = await arrive(f, "generate", lambda: f.http.post("/generate", json=LONG))
        assert not held.done(), held.result().text  # a lone request is always admitted
        body = CountedBody(b"not json")
        r = await f.http.post("/generate", content=body, headers={"content-type": "application/json"})
        assert_shed(r)
        assert body.pulled == 0, "the shed request's body was read"
        assert (await f.http.post("/classify", json={"text": "show me a cat"})).status_code == 200
        shed = [
            line
            for line in (await f.http.get("/metrics")).text.splitlines()
            if line.startswith("fluxserve_http_requests_total") and 'route="/generate"' in line
        ]
        assert any('status="503"' in line for line in shed), shed
        f.fake.release("generate")
        assert (await held).status_code == 200
