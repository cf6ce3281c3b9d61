"""What the facade tells a caller when something fails, checked in-process (the harness in
tests/unit/facade/: api.app.create_app over httpx.ASGITransport with a fake Triton client):

* a failure streamed as an SSE `error` event carries the same type and text as the JSON answer
  to the same failure: never Triton's address or a model's traceback;
* /readyz says why it is not ready in the fixed vocabulary of api.readiness.NotReady, never the
  details (they go to the log);
* /chat's generation options are /generate's, checks included: a seed that overflows with
  several images is a 422, as on /generate, not a 500.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from api.readiness import NotReady, Readiness
from contract.specs import CLASSIFY, GENERATE, GENERATE_LIMITS
from tests.unit.facade.fake_triton import triton_error
from tests.unit.facade.harness import SSE, Facade, sse_events

pytestmark = pytest.mark.anyio

ADDRESS = "10.9.8.7:8001"
UNREACHABLE = f"failed to connect to all addresses; last error: UNAVAILABLE: ipv4:{ADDRESS}: Connection refused"
TRACEBACK = (
    'Traceback (most recent call last):\n  File "/srv/model_repository/generate/1/model.py", line 88, in execute\n'
    "ZeroDivisionError: division by zero"
)
DEAD_STUB = "Stub process 'generate_0_0' is not healthy."
SECRETS = (ADDRESS, "10.9.8.7", "Traceback", "model.py", "ZeroDivisionError", "/srv/", "Stub process", "Connection")


def assert_nothing_internal(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{leaked} leaked in {text!r}"


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (lambda: triton_error(UNREACHABLE, "StatusCode.UNAVAILABLE"), 503, "unavailable"),
        (lambda: triton_error(TRACEBACK, "StatusCode.INTERNAL"), 502, "inference_failed"),
        (lambda: RuntimeError(f"lost {ADDRESS}"), 500, "internal_error"),
    ],
    ids=["triton-unreachable", "model-traceback", "unexpected"],
)
async def test_streamed_errors_say_what_json_errors_say(facade: Facade, error, status, kind) -> None:
    http, fake = facade.http, facade.fake
    fake.generate_error = error
    body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "num_images": 1}
    same_id = {"X-Request-ID": "same-request-id"}
    unary = await http.post("/generate", json=body, headers=same_id)
    streamed = await http.post("/generate", json=body, headers={**same_id, **SSE})
    chat = await http.post(
        "/chat",
        json={"message": "draw a lighthouse", "generate": {"width": 64, "height": 64, "steps": 2}},
        headers={**same_id, **SSE},
    )
    assert (unary.status_code, unary.json()["error"]["type"]) == (status, kind)
    assert "same-request-id" in unary.json()["error"]["message"]  # the log line to look for
    assert streamed.status_code == 200 and chat.status_code == 200
    for answer in (streamed, chat):
        events = sse_events(answer.text)
        assert events[-1] == ("error", unary.json())  # same type, same words
        assert_nothing_internal(answer.text)
    assert_nothing_internal(unary.text)


async def test_a_stub_dying_mid_stream_is_reported_to_readiness(facade: Facade) -> None:
    http, fake = facade.http, facade.fake
    fake.generate_error = lambda: triton_error(DEAD_STUB, "StatusCode.INTERNAL")
    body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
    streamed = await http.post("/generate", json=body, headers=SSE)
    assert sse_events(streamed.text)[-1][1]["error"]["type"] == "unavailable"
    assert_nothing_internal(streamed.text)
    await asyncio.wait_for(fake.reloading.wait(), 10)  # readiness reloads the model, as for JSON
    ready = await http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["problems"][GENERATE.name] == "model_failed"
    fake.reloaded.set()


async def test_readyz_reasons_come_from_a_fixed_vocabulary(facade: Facade) -> None:
    vocabulary = {r.value for r in NotReady}

    async def readyz(http) -> dict:
        answer = await http.get("/readyz")
        assert answer.status_code == (200 if answer.json()["ready"] else 503)
        assert_nothing_internal(answer.text)
        body = answer.json()
        if not body["ready"]:
            assert set(body["problems"].values()) <= vocabulary and body["reason"] in vocabulary
            assert answer.headers["Retry-After"]
        return body

    http, fake, state = facade.http, facade.fake, facade.state
    assert await readyz(http) == {"ready": True, "models": [CLASSIFY.name, GENERATE.name]}

    fake.server_ready = False
    body = await readyz(http)
    assert body["reason"] == "triton_unavailable" and set(body["problems"]) == {CLASSIFY.name, GENERATE.name}
    fake.server_ready = True

    fake.not_ready = {GENERATE.name}
    assert (await readyz(http))["problems"] == {GENERATE.name: "model_not_ready"}
    fake.not_ready = set()

    # A probe that fails: Triton's words about it stay in the log.
    state.readiness = Readiness(fake, 0.0)
    fake.classify_error = lambda: triton_error(UNREACHABLE, "StatusCode.INTERNAL")
    assert (await readyz(http))["problems"] == {CLASSIFY.name: "probe_failed"}

    # A dead stub met by a real request: reported as model_failed while it reloads.
    fake.classify_error = lambda: triton_error("Stub process 'classify_0_0' is not healthy.", "INTERNAL")
    assert (await http.post("/classify", json={"text": "hi"})).status_code == 503
    await asyncio.wait_for(fake.reloading.wait(), 10)
    body = await readyz(http)
    assert body["reason"] == "model_failed" and body["problems"][CLASSIFY.name] == "model_failed"
    fake.classify_error = None
    fake.reloaded.set()

    state.stopping.set()
    body = await readyz(http)
    assert body["reason"] == "shutting_down" and not body["ready"]


async def test_chat_refuses_an_overflowing_seed_as_generate_does(facade: Facade) -> None:
    top = GENERATE_LIMITS.max_seed  # 2**63 - 1: seeds seed and seed + 1 would not fit INT64
    http = facade.http
    options = {"width": 64, "height": 64, "steps": 2, "seed": top, "num_images": 2}
    generate = await http.post("/generate", json={"prompt": "a lighthouse", **options})
    chat = await http.post("/chat", json={"message": "draw a lighthouse", "generate": options})
    streamed = await http.post("/chat", json={"message": "draw a lighthouse", "generate": options}, headers=SSE)
    for answer in (generate, chat, streamed):
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["type"] == "invalid_request"
        assert "seed + num_images - 1" in answer.json()["error"]["message"]
    # The same options one step inside the bound are accepted by both.
    fine = {**options, "seed": top - 1}
    assert (await http.post("/generate", json={"prompt": "a lighthouse", **fine})).status_code == 200
    answer = await http.post("/chat", json={"message": "draw a lighthouse", "generate": fine})
    assert answer.status_code == 200 and answer.json()["image"]["seed"] == top - 1
    # Every bound of /generate holds on /chat: a few taken from the schema itself.
    for bad in ({"steps": 0}, {"width": 63}, {"guidance": float("nan")}, {"seed": -1}, {"extra": 1}):
        raw = json.dumps({"message": "draw", "generate": {**options, "seed": 1, **bad}})  # NaN as JSON allows
        answer = await http.post("/chat", content=raw, headers={"Content-Type": "application/json"})
        assert answer.status_code == 422, (bad, answer.text)
