"""POST /classify and the operational endpoints, through the real facade and real Triton."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.contract import CLASSIFY_LIMITS, LABELS
from tests.conftest import free_port, start_facade

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
