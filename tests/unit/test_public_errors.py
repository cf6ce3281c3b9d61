"""What the facade tells a caller when something fails, checked in-process (httpx.ASGITransport
against api.app.create_app, its lifespan run, with a fake Triton client in place of the real one):

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
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from api.app import create_app
from api.readiness import NotReady, Readiness
from api.settings import ApiSettings
from contract.codec import ClassifyResult, GenerateProgress, GenerateResult
from contract.errors import translate
from contract.specs import CLASSIFY, GENERATE, GENERATE_LIMITS, IMAGE_REQUEST, GenerateParams

KEY = "test-key-public-errors"
ADDRESS = "10.9.8.7:8001"
UNREACHABLE = f"failed to connect to all addresses; last error: UNAVAILABLE: ipv4:{ADDRESS}: Connection refused"
TRACEBACK = (
    'Traceback (most recent call last):\n  File "/srv/model_repository/generate/1/model.py", line 88, in execute\n'
    "ZeroDivisionError: division by zero"
)
DEAD_STUB = "Stub process 'generate_0_0' is not healthy."
SECRETS = (ADDRESS, "10.9.8.7", "Traceback", "model.py", "ZeroDivisionError", "/srv/", "Stub process", "Connection")


def triton_error(message: str, status: str | None = None) -> Exception:
    """What client.triton_client raises for a tritonclient exception (`translate(e) from e`)."""
    cause = InferenceServerException(msg=message, status=status)
    try:
        raise translate(cause) from cause
    except Exception as e:  # noqa: BLE001  (returned with its __cause__ set, as raised)
        return e


class FakeTriton:
    """The AsyncTritonClient methods the routes and readiness call; failures set per test."""

    def __init__(self) -> None:
        self.server_ready = True
        self.not_ready: set[str] = set()
        self.classify_error: Callable[[], Exception] | None = None
        self.generate_error: Callable[[], Exception] | None = None
        self.reloading = asyncio.Event()  # set when a reload starts; the reload waits for `reloaded`
        self.reloaded = asyncio.Event()

    async def is_ready(self, models: Sequence[str] = (CLASSIFY.name,)) -> bool:
        return self.server_ready and not set(models) & self.not_ready

    async def classify(self, texts: list[str]) -> list[ClassifyResult]:
        if self.classify_error is not None:
            raise self.classify_error()
        return [ClassifyResult(IMAGE_REQUEST, 0.99, {IMAGE_REQUEST: 0.99, "conversation": 0.01}, "1") for _ in texts]

    async def model_config(self, model: str, version: str = "") -> dict:
        return {"backend": "python"}

    async def model_parameter(self, model: str, key: str, version: str = "") -> str | None:
        return None

    async def newest_ready_version(self, model: str) -> str | None:
        return "1"

    async def reload_model(self, model: str, timeout_s: float = 300.0) -> None:
        self.reloading.set()
        await self.reloaded.wait()

    async def generate(self, params: GenerateParams) -> GenerateResult:
        if self.generate_error is not None:
            raise self.generate_error()
        return GenerateResult(np.zeros((params.height, params.width, 3), np.uint8), params.seed, "1")

    async def generate_stream(
        self, params: GenerateParams
    ) -> AsyncIterator[tuple[GenerateProgress, GenerateResult | None]]:
        yield GenerateProgress(1, params.steps, 0.01), None
        if self.generate_error is not None:
            raise self.generate_error()
        image = np.zeros((params.height, params.width, 3), np.uint8)
        yield GenerateProgress(params.steps, params.steps, 0.02), GenerateResult(image, params.seed, "1")

    async def close(self) -> None:
        pass


Scenario = Callable[[httpx.AsyncClient, FakeTriton, Any], Any]


def run_facade(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scenario: Scenario,
    fake_triton: Callable[[], FakeTriton] = FakeTriton,
    **settings_changes: Any,
) -> None:
    """Run `scenario(http, fake, state)` against an in-process facade whose Triton is
    `fake_triton()`; `http` sends the operator key unless a request says otherwise."""
    monkeypatch.setenv("FLUXSERVE_JOBS_JOBS_DIR", str(tmp_path / "jobs"))
    settings = ApiSettings(
        keys=f"tests:{KEY}",
        key_file=tmp_path / "no-key-file",
        classify_calls_inflight=0,
        triton_metrics_url=None,
        **settings_changes,
    )

    async def main() -> None:
        fake = fake_triton()
        app = create_app(settings, triton=lambda url, timeout_s: fake)
        state = app.state.fluxserve
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            headers = {"Authorization": f"Bearer {KEY}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", headers=headers) as http:
                await scenario(http, fake, state)

    asyncio.run(main())


def sse_events(text: str) -> list[tuple[str, dict]]:
    events, name = [], "message"
    for line in text.splitlines():
        if line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line.removeprefix("data:").strip())))
    return events


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
def test_streamed_errors_say_what_json_errors_say(tmp_path, monkeypatch, error, status, kind) -> None:
    async def scenario(http: httpx.AsyncClient, fake: FakeTriton, state: Any) -> None:
        fake.generate_error = error
        body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "num_images": 1}
        same_id = {"X-Request-ID": "same-request-id"}
        unary = await http.post("/generate", json=body, headers=same_id)
        streamed = await http.post("/generate", json=body, headers={**same_id, "Accept": "text/event-stream"})
        chat = await http.post(
            "/chat",
            json={"message": "draw a lighthouse", "generate": {"width": 64, "height": 64, "steps": 2}},
            headers={**same_id, "Accept": "text/event-stream"},
        )
        assert (unary.status_code, unary.json()["error"]["type"]) == (status, kind)
        assert "same-request-id" in unary.json()["error"]["message"]  # the log line to look for
        assert streamed.status_code == 200 and chat.status_code == 200
        for answer in (streamed, chat):
            events = sse_events(answer.text)
            assert events[-1] == ("error", unary.json())  # same type, same words
            assert_nothing_internal(answer.text)
        assert_nothing_internal(unary.text)

    run_facade(tmp_path, monkeypatch, scenario)


def test_a_stub_dying_mid_stream_is_reported_to_readiness(tmp_path, monkeypatch) -> None:
    async def scenario(http: httpx.AsyncClient, fake: FakeTriton, state: Any) -> None:
        fake.generate_error = lambda: triton_error(DEAD_STUB, "StatusCode.INTERNAL")
        body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
        streamed = await http.post("/generate", json=body, headers={"Accept": "text/event-stream"})
        assert sse_events(streamed.text)[-1][1]["error"]["type"] == "unavailable"
        assert_nothing_internal(streamed.text)
        await asyncio.wait_for(fake.reloading.wait(), 10)  # readiness reloads the model, as for JSON
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["problems"][GENERATE.name] == "model_failed"
        fake.reloaded.set()

    run_facade(tmp_path, monkeypatch, scenario)


def test_readyz_reasons_come_from_a_fixed_vocabulary(tmp_path, monkeypatch) -> None:
    vocabulary = {r.value for r in NotReady}

    async def readyz(http: httpx.AsyncClient) -> dict:
        answer = await http.get("/readyz")
        assert answer.status_code == (200 if answer.json()["ready"] else 503)
        assert_nothing_internal(answer.text)
        body = answer.json()
        if not body["ready"]:
            assert set(body["problems"].values()) <= vocabulary and body["reason"] in vocabulary
            assert answer.headers["Retry-After"]
        return body

    async def scenario(http: httpx.AsyncClient, fake: FakeTriton, state: Any) -> None:
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

    run_facade(tmp_path, monkeypatch, scenario)


def test_chat_refuses_an_overflowing_seed_as_generate_does(tmp_path, monkeypatch) -> None:
    top = GENERATE_LIMITS.max_seed  # 2**63 - 1: seeds seed and seed + 1 would not fit INT64

    async def scenario(http: httpx.AsyncClient, fake: FakeTriton, state: Any) -> None:
        options = {"width": 64, "height": 64, "steps": 2, "seed": top, "num_images": 2}
        generate = await http.post("/generate", json={"prompt": "a lighthouse", **options})
        chat = await http.post("/chat", json={"message": "draw a lighthouse", "generate": options})
        streamed = await http.post(
            "/chat", json={"message": "draw a lighthouse", "generate": options}, headers={"Accept": "text/event-stream"}
        )
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

    run_facade(tmp_path, monkeypatch, scenario)
