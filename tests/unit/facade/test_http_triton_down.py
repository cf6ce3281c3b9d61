"""The facade with Triton down, in-process: the real gRPC client (client.triton_client.
AsyncTritonClient) pointed at a loopback port where nothing listens, so the failure is the one a
dead Triton gives, without a facade process. Liveness stays up, readiness and inference answer 503
at once, the caller's request id travels to the answer and the log line, and nothing of Triton's
text or address reaches the caller. Moved here from tests/integration (test_facade_classify's
Triton-down test, test_hostile_input's request-id and leak tests, which ran a facade process)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator

import pytest

from api.request_id import RequestIdFilter
from client.triton_client import AsyncTritonClient
from runtime.processes import free_port
from tests.unit.facade.harness import Facade, running_facade

pytestmark = pytest.mark.anyio


@pytest.fixture
async def down() -> AsyncIterator[Facade]:
    async with running_facade(triton=AsyncTritonClient, triton_grpc_url=f"127.0.0.1:{free_port()}") as f:
        yield f


@pytest.fixture
def request_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The facade's log records, each with the request id it was written under (`request_id`)."""
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestIdFilter())
    return caplog


def lines_of(caplog: pytest.LogCaptureFixture, request_id: str) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if getattr(r, "request_id", None) == request_id]


async def test_triton_down_gives_503_quickly(down: Facade) -> None:
    assert (await down.http.get("/healthz")).status_code == 200
    ready = await down.http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["reason"] == "triton_unavailable"
    started = time.monotonic()
    r = await down.http.post("/classify", json={"text": "hello"})
    took = time.monotonic() - started
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable", r.text
    assert int(r.headers["retry-after"]) >= 1
    assert took < 15, "a dead Triton must not hang the request"


async def test_inference_routes_stay_open_by_default(down: Facade) -> None:
    # Triton is down here: 503, but not 401.
    r = await down.anon.post("/classify", json={"text": "hi"})
    assert r.status_code == 503, r.text


async def test_request_id_on_responses_and_log_lines(down: Facade, request_log: pytest.LogCaptureFixture) -> None:
    http = down.anon
    guess = await http.get("/train", headers={"X-Request-ID": "guess-1", "Authorization": "Bearer " + "y" * 30})
    # Triton is down here: the 503 is logged, under the caller's id.
    mine = await http.post("/classify", json={"text": "hi"}, headers={"X-Request-ID": "caller-id-123"})
    odd = await http.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces" + "z" * 200})
    fresh = await http.get("/healthz")
    unknown = await http.get("/no/such/route")
    assert guess.status_code == 401 and guess.headers["x-request-id"] == "guess-1"
    assert mine.status_code == 503 and mine.headers["x-request-id"] == "caller-id-123"
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
    assert fresh.headers["x-request-id"] != odd.headers["x-request-id"]
    assert unknown.status_code == 404 and unknown.headers["x-request-id"]
    assert unknown.json()["error"]["type"] == "not_found"
    assert lines_of(request_log, "caller-id-123")
    # A wrong key writes no line of its own: a guessing client would fill the log (api/auth_limit.py
    # warns once, when the client is limited).
    assert not lines_of(request_log, "guess-1")


async def test_errors_do_not_leak_addresses_or_triton_text(down: Facade, request_log: pytest.LogCaptureFixture) -> None:
    ready = await down.anon.get("/readyz")
    classify = await down.anon.post("/classify", json={"text": "hello"}, headers={"X-Request-ID": "leak-check"})
    assert ready.status_code == 503 and ready.json()["ready"] is False  # deliberate: Triton is down
    assert "127.0.0.1" not in ready.text and "triton" not in ready.json()
    assert classify.status_code == 503
    body = classify.json()["error"]
    assert body["type"] == "unavailable" and "leak-check" in body["message"]
    assert "127.0.0.1" not in classify.text and "failed to connect" not in classify.text.lower()
    logged = lines_of(request_log, "leak-check")
    assert logged and any("ServerUnavailableError" in line for line in logged), logged
