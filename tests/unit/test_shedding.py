"""Early shedding: the refusal path before every middleware, and the pacing of refusals (issue 24)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from api.admission import Admission, AdmissionSettings, CostQueue
from api.shedding import EarlyShed, RefusalPacer, ShedRoute


def test_pacer_holds_immediate_retries_only(monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[float] = []

    async def sleep(delay: float) -> None:
        held.append(delay)

    monkeypatch.setattr("api.shedding.asyncio.sleep", sleep)
    pacer = RefusalPacer(budget_per_s=10.0, max_hold_s=0.5, retry_window_s=60.0)

    async def run() -> None:
        await pacer.held(("10.0.0.1", 1))  # a first refusal: answered at once
        await pacer.held(("10.0.0.2", 1))  # another connection: at once too
        await pacer.held(None)  # untracked: never held
        await pacer.held(("10.0.0.1", 1))  # the same connection again, within the window: held
        pacer.retry_window_s = 0.0
        await pacer.held(("10.0.0.1", 1))  # back after the window: an independent arrival

    asyncio.run(run())
    assert held == [pytest.approx(0.1)] and pacer.pending == 0


def test_pacer_holds_only_when_many_refusals_are_pending() -> None:
    pacer = RefusalPacer(budget_per_s=100.0, max_hold_s=0.5)
    pacer.pending = 1
    assert pacer.hold_s() == pytest.approx(0.01)
    pacer.pending = 20
    assert pacer.hold_s() == pytest.approx(0.2)
    pacer.pending = 10_000
    assert pacer.hold_s() == 0.5  # a refusal is always answered well under a second
    assert RefusalPacer(100.0, 0.0).hold_s() == 0.0  # off


class _Inner:
    """The application behind the shedder: counts calls and reads the body."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


def _stack(queue: CostQueue, pacer: RefusalPacer) -> tuple[EarlyShed, _Inner, list[int]]:
    admission = Admission(AdmissionSettings(), model_facts=None)  # type: ignore[arg-type]
    admission.classify = queue
    counted: list[int] = []
    inner = _Inner()
    shed = EarlyShed(
        inner,
        admission=lambda: admission,
        lag_s=lambda: 0.0,
        routes={"/classify": ShedRoute(lambda a: a.classify, lambda: counted.append(1))},
        pacer=pacer,
    )
    return shed, inner, counted


def test_full_queue_is_refused_before_the_app_and_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    queue = CostQueue("classification", "texts", max_wait_s=0.1, initial_rate=100.0, smoothing=0.3, floor=2.0)
    held: list[float] = []

    async def sleep(delay: float) -> None:  # records the pacer's hold instead of waiting it out
        held.append(delay)

    monkeypatch.setattr("api.shedding.asyncio.sleep", sleep)
    shed, inner, counted = _stack(queue, RefusalPacer(budget_per_s=10.0, max_hold_s=0.5, retry_window_s=60.0))

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=shed), base_url="http://t") as client:
            out = [await client.post("/classify", json={"text": "hi"})]  # room: passes through
            for _ in range(10):
                queue.admit(1.0)  # 0.1 s of texts in flight: a typical request more is too much
            out.append(await client.post("/classify", json={"text": "hi"}))
            out.append(await client.post("/classify", json={"text": "hi"}))  # retried at once: held
            out.append(await client.get("/classify"))  # not a POST: not shed here
            out.append(await client.post("/healthz", json={}))  # not a shed route
            return out

    ok, refused, retried, get, other = asyncio.run(run())
    assert ok.status_code == 200 and get.status_code == 200 and other.status_code == 200
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert retried.status_code == 503
    assert refused.json()["error"]["type"] == "unavailable" and "capacity" in refused.json()["error"]["message"]
    assert inner.calls == 3 and counted == [1, 1]
    assert held == [pytest.approx(0.1)]  # the retry only: one pending at 10/s


def test_refusal_answers_are_built_once() -> None:
    queue = CostQueue("classification", "texts", max_wait_s=0.1, initial_rate=100.0, smoothing=0.3)
    shed, _, _ = _stack(queue, RefusalPacer(0.0, 0.0))
    first = shed._answers.get("/classify", queue)
    assert shed._answers.get("/classify", queue) is first  # no per-refusal allocation


def test_lone_request_is_never_shed() -> None:
    queue = CostQueue("classification", "texts", max_wait_s=0.0, initial_rate=0.0, smoothing=0.3)
    shed, inner, counted = _stack(queue, RefusalPacer(0.0, 0.0))

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=shed), base_url="http://t") as client:
            return await client.post("/classify", json={"text": "hi"})

    assert asyncio.run(run()).status_code == 200 and inner.calls == 1 and counted == []
