"""api.services: the one path of model work behind /generate (JSON, raw, SSE), /chat and /classify,
in-process against a fake Triton whose calls wait on events (no sleeps, no Triton):

* one fate for a request's images: one failing cancels the others in Triton, and the admission
  it held is given back; so do a server beginning to stop (503 + Retry-After, or an `error` event),
  the deadline passing (504) and a streamed answer's client leaving;
* /chat's classification is the classification service's, admission included (it used to skip it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from api.schemas import GenerateRequest
from api.services.generation import Done, Progress
from contract.codec import GenerateProgress, GenerateResult
from contract.errors import InferenceError
from contract.specs import GenerateParams
from tests.unit.facade.fake_triton import FakeTriton, seed_image
from tests.unit.facade.harness import SSE, Facade, running_facade, sse_events

SMALL = {"width": 64, "height": 64, "steps": 2}


class StuckTriton(FakeTriton):
    """Generations that never finish by themselves (streams after their first step), except the
    seed in `failing`, which fails once every image has reached Triton. Records which calls were
    cancelled or closed while running."""

    def __init__(self, images: int = 1) -> None:
        super().__init__()
        self.images = images
        self.failing: int | None = None
        self.ended: list[int] = []
        self.running = 0

    async def _stuck(self, params: GenerateParams) -> None:
        self.running += 1
        try:
            if params.seed == self.failing:
                await self.wait_entered("generate", self.images)
                raise InferenceError("image failed")
            await asyncio.Event().wait()
        except (asyncio.CancelledError, GeneratorExit):
            self.ended.append(params.seed)
            raise
        finally:
            self.running -= 1

    async def generate(self, params: GenerateParams) -> GenerateResult:
        await self._enter("generate", "generate")
        await self._stuck(params)
        raise AssertionError("unreachable")

    async def generate_stream(self, params: GenerateParams) -> AsyncIterator[tuple[GenerateProgress, None]]:
        await self._enter("generate", "generate_stream")
        yield GenerateProgress(1, params.steps, 0.01), None
        await self._stuck(params)


def run(scenario: Callable[[Facade], Awaitable[Any]], fake: FakeTriton, monkeypatch, tmp_path, **settings) -> None:
    monkeypatch.setenv("FLUXSERVE_JOBS_JOBS_DIR", str(tmp_path / "jobs"))

    async def main() -> None:
        async with running_facade(fake, **settings) as f, asyncio.timeout(30):  # a fate not met hangs: fail
            await scenario(f)

    asyncio.run(main())


def assert_nothing_held(f: Facade) -> None:
    admission = f.state.admission
    assert admission.generate.in_flight == 0 and admission.dispatch.out == 0 and admission.memory.in_flight == 0


@pytest.mark.parametrize("headers", [{}, SSE], ids=["json", "sse"])
def test_one_failing_image_cancels_the_others(monkeypatch, tmp_path, headers: dict) -> None:
    fake = StuckTriton(images=3)
    fake.failing = 11

    async def scenario(f: Facade) -> None:
        r = await f.http.post(
            "/generate", json={"prompt": "a fox", "seed": 10, "num_images": 3, **SMALL}, headers=headers
        )
        failure = r.json() if not headers else sse_events(r.text)[-1][1]
        assert r.status_code == (200 if headers else 502) and failure["error"]["type"] == "inference_failed"
        assert sorted(fake.ended) == [10, 12] and fake.running == 0  # cancelled in Triton, not left running
        assert_nothing_held(f)

    run(scenario, fake, monkeypatch, tmp_path)


def test_a_stopping_server_ends_generations_with_503(monkeypatch, tmp_path) -> None:
    fake = StuckTriton(images=2)

    async def scenario(f: Facade) -> None:
        body = {"prompt": "a fox", "seed": 1, **SMALL}
        unary = asyncio.create_task(f.http.post("/generate", json=body))
        streamed = asyncio.create_task(f.http.post("/generate", json={**body, "seed": 2}, headers=SSE))
        await fake.wait_entered("generate", 2)
        f.state.stopping.set()
        r, s = await unary, await streamed
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"] == {"type": "unavailable", "message": "the server is shutting down; retry shortly"}
        events = sse_events(s.text)
        assert [n for n, _ in events] == ["progress", "error"] and events[-1][1] == r.json()
        assert sorted(fake.ended) == [1, 2] and fake.running == 0
        assert_nothing_held(f)

    run(scenario, fake, monkeypatch, tmp_path)


@pytest.mark.parametrize("headers", [{}, SSE], ids=["json", "sse"])
def test_the_deadline_ends_a_generation_with_504(monkeypatch, tmp_path, headers: dict) -> None:
    fake = StuckTriton()

    async def scenario(f: Facade) -> None:
        r = await f.http.post("/generate", json={"prompt": "a fox", "seed": 5, **SMALL}, headers=headers)
        failure = r.json() if not headers else sse_events(r.text)[-1][1]
        assert r.status_code == (200 if headers else 504)
        assert failure["error"]["type"] == "timeout" and "0.2s" in failure["error"]["message"]
        assert fake.ended == [5] and fake.running == 0
        assert_nothing_held(f)

    run(scenario, fake, monkeypatch, tmp_path, generate_timeout_s=0.2)


def test_leaving_a_stream_cancels_its_images_at_once(monkeypatch, tmp_path) -> None:
    """What an SSE client that goes away does to the service's stream (sse-starlette closes it)."""
    fake = StuckTriton(images=2)

    async def scenario(f: Facade) -> None:
        stream = f.app.state.generation.stream(GenerateRequest(prompt="a fox", seed=7, num_images=2, **SMALL))
        first = await anext(stream)
        assert isinstance(first, Progress) and first.step == 1
        await fake.wait_entered("generate", 2)
        await stream.aclose()
        assert sorted(fake.ended) == [7, 8] and fake.running == 0
        assert_nothing_held(f)

    run(scenario, fake, monkeypatch, tmp_path)


def test_the_unary_answer_is_the_fold_of_the_stream(monkeypatch, tmp_path) -> None:
    async def scenario(f: Facade) -> None:
        service = f.app.state.generation
        body = GenerateRequest(prompt="a fox", seed=3, num_images=2, **SMALL)
        events = [e async for e in service.stream(body)]
        done = await service.run(body)
        assert all(isinstance(e, Progress) for e in events[:-1]) and isinstance(events[-1], Done)
        assert [e.fraction for e in events[:-1]][-1] == 1.0
        assert isinstance(done, Done) and events[-1].images == done.images and done.seed == 3
        assert (events[-1].prompt, events[-1].model_version) == (done.prompt, done.model_version)
        assert f.fake.calls["generate"] == 2 and f.fake.calls["generate_stream"] == 2
        assert seed_image(f.fake.generated[0]).shape == (64, 64, 3)

    run(scenario, FakeTriton(), monkeypatch, tmp_path)


def test_chat_classifies_through_admission(monkeypatch, tmp_path) -> None:
    """/chat's classification is admitted as /classify's is: refused (503) with the classifier's
    queue full, before any model runs."""

    async def scenario(f: Facade) -> None:
        queue = f.state.admission.classify
        full = queue.limit() * 10
        queue.admit(full)
        try:
            for headers in ({}, SSE):
                r = await f.http.post("/chat", json={"message": "draw a fox", "generate": SMALL}, headers=headers)
                error = r.json() if not headers else sse_events(r.text)[-1][1]
                assert error["error"]["type"] == "unavailable" and "classification is at capacity" in str(error)
            assert f.fake.calls["classify"] == 0 and f.fake.calls["generate"] == 0
        finally:
            queue.release(full, completed=False)
        r = await f.http.post("/chat", json={"message": "draw a fox", "generate": SMALL})
        assert r.status_code == 200 and r.json()["kind"] == "image"

    run(scenario, FakeTriton(), monkeypatch, tmp_path)
