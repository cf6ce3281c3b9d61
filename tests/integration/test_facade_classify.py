"""POST /classify through the real facade and real Triton: the real classifier's answers, and
concurrent requests sharing Triton calls. The facade's HTTP rules (validation and its envelope,
/healthz, /readyz, /metrics, /docs, Triton down) are checked in-process in tests/unit/facade/."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contract.specs import LABELS
from tests.conftest import Facade, start_facade

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
