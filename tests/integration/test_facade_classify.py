"""POST /classify and the operational endpoints, through the real facade and real Triton."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contract.specs import CLASSIFY_LIMITS, LABELS
from tests.conftest import Facade, free_port, start_facade

pytestmark = pytest.mark.integration


def test_single(facade) -> None:
    with facade.client() as http:
        r = http.post("/classify", json={"text": "can I see you in the kitchen?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == "image_request"
    assert set(body["scores"]) == set(LABELS)
    assert body["score"] == pytest.approx(body["scores"]["image_request"])
    assert isinstance(body["uncertain"], bool)


def test_batch(facade) -> None:
    texts = ["make an image of you in Paris", "see you tomorrow", "selfie?"]
    with facade.client() as http:
        r = http.post("/classify", json={"texts": texts})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["label"] for x in results][:2] == ["image_request", "conversation"]
    assert len(results) == 3


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "exactly one"),
        ({"text": ""}, "text"),
        ({"text": "   "}, "empty"),
        ({"text": 42}, "text"),
        ({"texts": []}, "texts"),
        ({"texts": "not a list"}, "texts"),
        ({"texts": ["ok", ""]}, "texts.1"),
        ({"texts": ["ok"] * (CLASSIFY_LIMITS.max_texts_per_request + 1)}, "texts"),
        ({"text": "x" * (CLASSIFY_LIMITS.max_text_chars + 1)}, "text"),
        ({"text": "hi", "texts": ["hi"]}, "exactly one"),
        ({"text": "hi", "extra": 1}, "extra"),
    ],
)
def test_bad_input_is_422_with_message(facade, body: dict, fragment: str) -> None:
    with facade.client() as http:
        r = http.post("/classify", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request"
    assert fragment in err["message"]
    assert "Traceback" not in r.text


def test_malformed_json_is_4xx(facade) -> None:
    with facade.client() as http:
        r = http.post("/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "error" in r.json()


def test_health_ready_metrics_docs(facade) -> None:
    with facade.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").status_code == 200
        http.post("/classify", json={"text": "hello"})
        http.post("/classify", json={"text": ""})
        http.get("/no/such/path")
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
        # Counted by route template and the status the client saw, errors included.
        counted = {
            (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
            for s in families["fluxserve_http_requests"].samples
            if s.name.endswith("_total")
        }
        for key in (("/classify", "POST", "200"), ("/classify", "POST", "422"), ("unmatched", "GET", "404")):
            assert counted.get(key, 0) >= 1, (key, counted)
        timed = {
            s.labels["route"]: s.value
            for s in families["fluxserve_http_request_duration_seconds"].samples
            if s.name.endswith("_count")
        }
        assert timed["/classify"] >= 2
        assert http.get("/docs").status_code == 200
        assert "/classify" in http.get("/openapi.json").json()["paths"]


def test_triton_down_gives_503_quickly() -> None:
    facade = start_facade(f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        with facade.client(timeout_s=30) as http:
            assert http.get("/healthz").status_code == 200
            assert http.get("/readyz").status_code == 503
            started = time.monotonic()
            r = http.post("/classify", json={"text": "hello"})
            took = time.monotonic() - started
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "unavailable"
        assert took < 15, "a dead Triton must not hang the request"
    finally:
        facade.stop()


CLEAR_CUT = {
    "make an image of you in Paris": "image_request",
    "draw me a red fox sleeping in the snow": "image_request",
    "send me a selfie from the beach": "image_request",
    "see you tomorrow": "conversation",
    "how was your day?": "conversation",
    "I'm going to bed now, good night": "conversation",
}


def _classify_calls(http: httpx.Client) -> float:
    """Triton classify calls the facade has made (its histogram of texts per call)."""
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    return next(s.value for s in families["fluxserve_classify_call_texts"].samples if s.name.endswith("_count"))


@pytest.fixture(scope="module")
def patient_facade(triton) -> Iterator[Facade]:
    """A facade whose /classify wait bound admits a burst of 60 requests (the default sheds part of
    it, as issue 15 wants): here every request must reach the batcher."""
    f = start_facade(triton.grpc_url, {"FLUXSERVE_ADMISSION_CLASSIFY_MAX_WAIT_S": "30"}, ready_path="/readyz")
    yield f
    f.stop()


def test_concurrent_requests_share_calls_and_keep_their_answers(patient_facade: Facade) -> None:
    """api/classify_batcher.py through the real facade and Triton: many concurrent requests (singles,
    batches, and clients that hang up at once) travel in fewer Triton calls, and every request that
    stayed gets exactly its own texts' answers, in order."""
    facade = patient_facade
    texts = list(CLEAR_CUT)
    with facade.client() as http:
        calls_before = _classify_calls(http)

    async def scenario() -> list[tuple[list[str], httpx.Response | None]]:
        async with (
            httpx.AsyncClient(base_url=facade.url, timeout=60) as client,
            httpx.AsyncClient(base_url=facade.url, timeout=0.005) as impatient,
        ):

            async def one(i: int) -> tuple[list[str], httpx.Response | None]:
                mine = [texts[(i + j) % len(texts)] for j in range(1 + i % 3)]
                if i % 5 == 4:  # hangs up before its answer: must not disturb the others
                    with contextlib.suppress(httpx.TimeoutException):
                        await impatient.post("/classify", json={"texts": mine})
                    return mine, None
                body = {"text": mine[0]} if len(mine) == 1 else {"texts": mine}
                return mine, await client.post("/classify", json=body)

            return await asyncio.gather(*(one(i) for i in range(60)))

    answered = 0
    for mine, response in asyncio.run(scenario()):
        if response is None:
            continue
        assert response.status_code == 200, response.text
        body = response.json()
        results = [body] if len(mine) == 1 else body["results"]
        assert [r["label"] for r in results] == [CLEAR_CUT[t] for t in mine]
        answered += len(mine)
    with facade.client() as http:
        calls_after = _classify_calls(http)
    assert answered >= 48 * 1.5
    # 60 requests (48 waited for answers) in fewer calls than requests: they shared.
    assert 1 <= calls_after - calls_before < 60
