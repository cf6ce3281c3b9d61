"""Early shedding: the refusal path before every middleware, and the pacing of refusals (issue 24)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from api.admission import Admission, AdmissionSettings, CostQueue
from api.shedding import EarlyShed, RefusalPacer, Shedder, ShedRoute
from tests.conftest import uvicorn_serving


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
    shedder = Shedder(
        admission=lambda: admission,
        lag_s=lambda: 0.0,
        routes={"/classify": ShedRoute(lambda a: a.classify, lambda: counted.append(1))},
        pacer=pacer,
    )
    return EarlyShed(inner, shedder), inner, counted


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
    first = shed.shedder.answer("/classify", queue)
    assert shed.shedder.answer("/classify", queue) is first  # no per-refusal allocation


def test_lone_request_is_never_shed() -> None:
    queue = CostQueue("classification", "texts", max_wait_s=0.0, initial_rate=0.0, smoothing=0.3)
    shed, inner, counted = _stack(queue, RefusalPacer(0.0, 0.0))

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=shed), base_url="http://t") as client:
            return await client.post("/classify", json={"text": "hi"})

    assert asyncio.run(run()).status_code == 200 and inner.calls == 1 and counted == []


# The same refusals in the HTTP protocol (api/slow_clients.py), against a real uvicorn.


class _RecordingPacer(RefusalPacer):
    """Records each refusal's hold (None: answered at once)."""

    def __init__(self, budget_per_s: float) -> None:
        super().__init__(budget_per_s, max_hold_s=0.5, retry_window_s=60.0)
        self.holds: list[float | None] = []

    def begin(self, client: object, lag_s: float) -> float | None:
        hold = super().begin(client, lag_s)
        self.holds.append(hold)
        return hold


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if line)
    headers = {k.lower(): v for k, v in headers.items()}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(head[0].split()[1]), headers, body


async def _protocol_scenario(queue: CostQueue, pacer: _RecordingPacer) -> dict[str, object]:
    from api.slow_clients import guarded_protocol

    shed, inner, counted = _stack(queue, pacer)
    protocol = guarded_protocol(10.0, 10.0, 1e6, 64, shed.shedder)
    reached: list[str] = []  # requests that reached the ASGI app at all

    async def app(scope, receive, send) -> None:
        reached.append(f"{scope['method']} {scope['path']}")
        await shed(scope, receive, send)

    post = b"POST /classify?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 13\r\n\r\n"
    out: dict[str, object] = {}
    async with uvicorn_serving(app, protocol) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post + b'{"text":"hi"}')
        out["refused"] = await _read_answer(reader)
        writer.write(post + b'{"text":"hi"}')  # retried at once on the same connection: held
        out["retried"] = await _read_answer(reader)
        writer.write(post)  # the body comes after its refusal, then the next request
        out["before_body"] = await _read_answer(reader)
        writer.write(b'{"text":"hi"}GET /classify HTTP/1.1\r\nHost: a\r\n\r\n')
        out["after"] = await _read_answer(reader)
        # Pipelined behind a request in flight: the app's turn, in order (EarlyShed decides there).
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n" + post + b'{"text":"hi"}')
        out["pipelined"] = [await _read_answer(reader), await _read_answer(reader)]
        writer.close()
        # HTTP/1.0: answered, then closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /classify HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        out["http10"] = await _read_answer(reader)
        out["http10_closed"] = await reader.read() == b""
        writer.close()
        # A chunked body, then "Connection: close": the chunks are dropped, then answered and closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /classify HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        out["chunked"] = await _read_answer(reader)
        writer.write(b"5\r\nhello\r\n0\r\n\r\nPOST /classify HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        out["close"] = await _read_answer(reader)
        out["close_closed"] = await reader.read() == b""
        writer.close()
        # A client that leaves while its refusal is held: the pacer lets it go.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post + b'{"text":"hi"}')
        await _read_answer(reader)
        writer.write(post + b'{"text":"hi"}')
        while pacer.pending == 0:
            await asyncio.sleep(0.005)
        writer.close()
        while pacer.pending:
            await asyncio.sleep(0.005)
        out["pending_after_leaving"] = pacer.pending
    out["app_calls"], out["counted"], out["reached"] = inner.calls, len(counted), reached
    return out


def test_the_protocol_refuses_before_the_app_and_keeps_the_connection() -> None:
    queue = CostQueue("classification", "texts", max_wait_s=0.1, initial_rate=100.0, smoothing=0.3, floor=2.0)
    for _ in range(10):
        queue.admit(1.0)  # full: every POST /classify is refused
    pacer = _RecordingPacer(budget_per_s=20.0)
    out = asyncio.run(_protocol_scenario(queue, pacer))
    status, headers, body = out["refused"]  # type: ignore[misc]
    assert status == 503 and int(headers["retry-after"]) >= 1 and "date" in headers
    assert json.loads(body)["error"]["type"] == "unavailable"
    assert out["retried"][0] == 503 and out["before_body"][0] == 503  # type: ignore[index]
    assert out["after"][0] == 200 and out["after"][2] == b"ok"  # type: ignore[index]
    # The body that came late was dropped, not read as a request; the connection stayed in step.
    # Pipelined behind a request in flight, the POST took the app's path, where EarlyShed refused it.
    assert [a[0] for a in out["pipelined"]] == [200, 503]  # type: ignore[union-attr]
    assert out["http10"][0] == 503 and out["http10_closed"]  # type: ignore[index]
    assert out["chunked"][0] == 503 and out["close"][0] == 503 and out["close_closed"]  # type: ignore[index]
    assert out["pending_after_leaving"] == 0
    # Held: the immediate retries (0.05 s each at 20 a second); answered at once: the first refusals.
    assert pacer.holds[:3] == [None, pytest.approx(0.05), pytest.approx(0.05)]
    # Only the GETs and the pipelined POST reached the ASGI app; every refusal was counted.
    assert out["reached"] == ["GET /classify", "GET /x", "POST /classify"]
    assert out["app_calls"] == 2 and out["counted"] == 9


async def _burst_scenario(queue: CostQueue) -> dict[str, object]:
    """Five requests on five connections in one turn of the event loop, with room for one."""
    from api.slow_clients import guarded_protocol

    release = asyncio.Event()
    reached: list[str] = []  # requests that reached the ASGI application at all
    handled: list[bytes] = []

    async def handler(scope, receive, send) -> None:
        body = (await receive())["body"]
        handled.append(body)
        if body == b"bad":  # ends before its admission, as a 422 does
            status = 422
        else:
            async with queue.admitted(1.0):
                await release.wait()
            status = 200
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    shedder = Shedder(
        lambda: admission,
        lambda: 0.0,
        {"/classify": ShedRoute(lambda a: a.classify, lambda: None)},
        RefusalPacer(0.0, 0.0),
    )
    admission = Admission(AdmissionSettings(), model_facts=None)  # type: ignore[arg-type]
    admission.classify = queue
    protocol = guarded_protocol(10.0, 10.0, 1e6, 64, shedder)
    shed = EarlyShed(handler, shedder)

    async def app(scope, receive, send) -> None:
        reached.append(scope["path"])
        await shed(scope, receive, send)

    out: dict[str, object] = {}

    def post(body: bytes) -> bytes:
        return b"POST /classify HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async with uvicorn_serving(app, protocol) as port:
        try:  # a handler left waiting would hold up the server's shutdown
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
            for _, writer in conns:
                writer.write(post(b"ok"))  # no await between: the server reads all five in one turn
            statuses = [(await _read_answer(reader))[0] for reader, _ in conns[1:]]
            while not handled:  # the one let in is admitted, and holds its place
                await asyncio.sleep(0.005)
            out["refused_at_once"], out["reached"] = list(statuses), list(reached)
            out["entering_while_admitted"] = queue.entering
            release.set()
            statuses.insert(0, (await _read_answer(conns[0][0]))[0])
            out["statuses"] = statuses
            reader, writer = conns[0]
            writer.write(post(b"bad"))  # let in, then ends without being admitted
            out["bad"] = (await _read_answer(reader))[0]
            out["entering_after_bad"] = queue.entering
            writer.write(post(b"ok")[:-2])  # let in, but its body trickles: it holds no room meanwhile
            while len(reached) < 3:
                await asyncio.sleep(0.005)
            out["entering_while_trickling"] = queue.entering
            writer.write(b"ok")
            out["trickled"] = (await _read_answer(reader))[0]
            writer.write(post(b"ok"))  # let in; its client leaves before the answer
            while len(handled) < 4:
                await asyncio.sleep(0.005)
            writer.close()
            while queue.in_flight > 1.0:
                await asyncio.sleep(0.005)
            out["entering_after_leaving"] = queue.entering
            for _, w in conns[1:]:
                w.close()
        finally:
            release.set()
    return out


def test_a_burst_is_judged_at_the_door_one_by_one() -> None:
    """Each request the door lets in holds its room until its handler admits it, so a burst read in
    one turn sees the room shrink: the rest are refused at the door, none further in."""
    queue = CostQueue("classification", "texts", max_wait_s=0.0, initial_rate=0.0, smoothing=0.3, floor=2.0)
    queue.admit(1.0)  # in flight: room for one more text
    queue.typical_cost = 1.0
    out = asyncio.run(_burst_scenario(queue))
    assert out["refused_at_once"] == [503, 503, 503, 503]
    assert out["reached"] == ["/classify"]  # only the one let in reached the application
    assert out["entering_while_admitted"] == 0.0  # its handler took its room over
    assert out["statuses"] == [200, 503, 503, 503, 503]
    assert out["bad"] == 422 and out["entering_after_bad"] == 0.0
    assert out["entering_while_trickling"] == 0.0 and out["trickled"] == 200
    assert out["entering_after_leaving"] == 0.0 and queue.in_flight == 1.0
