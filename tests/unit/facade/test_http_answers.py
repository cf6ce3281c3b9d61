"""What the facade answers when things go right, in-process against a fake Triton whose images
are one grey level drawn from their seed (tests/unit/facade/fake_triton.py): /generate as JSON, raw
bytes (Accept: image/*) and server-sent events, /chat in each of its kinds, and the operational
routes (/healthz, /readyz, /metrics counts, /docs, the OpenAPI document). Moved here from
tests/integration (test_generate, test_generate_stream, test_chat, test_facade_classify), which
sent the same requests to a facade process in front of a real Triton; what only the real models
can show (the image itself, the classifier's labels) stays there."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from contract.specs import CLASSIFY, GENERATE, TRIGGER_PARAMETER
from tests.unit.facade.fake_triton import CONVERSATION, SCORE, FakeTriton, seed_level
from tests.unit.facade.harness import SSE, Facade, sse_events

pytestmark = pytest.mark.anyio

SMALL = {"width": 64, "height": 64, "steps": 3}
DEPLOYED_TRIGGER = "Deployed Words"


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decoded(b64).convert("RGB"))


@pytest.fixture
def fake() -> FakeTriton:
    """The generate model deployed with trigger words of its own (a LoRA's), as a publish writes them."""
    f = FakeTriton()
    f.configs[GENERATE.name] = {
        "backend": "python",
        "parameters": {TRIGGER_PARAMETER: {"string_value": DEPLOYED_TRIGGER}},
    }
    return f


# ----------------------------------------------------------------------------- /generate


async def test_generate_json(facade: Facade) -> None:
    r = await facade.http.post("/generate", json={"prompt": "a red fox in snow", **SMALL, "seed": 11, "num_images": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 11 and len(body["images"]) == 2
    assert body["prompt"] == f"{DEPLOYED_TRIGGER}, a red fox in snow"  # the serving LoRA's trigger words added
    assert body["model_version"].isdigit()
    assert {"inference_s", "total_s"} <= set(body["timings"])
    first, second = (pixels(x) for x in body["images"])
    assert first.shape == (64, 64, 3)
    # num_images uses seeds seed, seed + 1: each image is the one its own seed made.
    assert [p.seed for p in facade.fake.generated] == [11, 12]
    assert (first == seed_level(11)).all() and (second == seed_level(12)).all()
    assert {p.prompt for p in facade.fake.generated} == {body["prompt"]}


async def test_trigger_words_are_not_added_twice(facade: Facade) -> None:
    r = await facade.http.post("/generate", json={"prompt": f"{DEPLOYED_TRIGGER.lower()}, a fox", **SMALL})
    assert r.json()["prompt"] == f"{DEPLOYED_TRIGGER.lower()}, a fox"


async def test_trigger_words_inside_another_word_do_not_count(facade: Facade) -> None:
    """The rule training captions were written by (common.trigger_word): whole words only."""
    prompt = f"a {DEPLOYED_TRIGGER.lower()}ish fox"
    r = await facade.http.post("/generate", json={"prompt": prompt, **SMALL})
    assert r.json()["prompt"] == f"{DEPLOYED_TRIGGER}, {prompt}"


async def test_unseeded_requests_get_a_random_seed(facade: Facade) -> None:
    seeds = [(await facade.http.post("/generate", json={"prompt": "a fox", **SMALL})).json()["seed"] for _ in range(3)]
    assert all(isinstance(s, int) and s >= 0 for s in seeds) and len(set(seeds)) > 1
    assert [p.seed for p in facade.fake.generated] == seeds


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_output_formats_and_raw_bytes(facade: Facade, fmt: str) -> None:
    body = {"prompt": "a fox", **SMALL, "seed": 3}
    r = await facade.http.post("/generate", json={**body, "output_format": fmt})
    raw = await facade.http.post("/generate", json=body, headers={"Accept": f"image/{fmt}"})
    assert r.status_code == 200 and decoded(r.json()["images"][0]).format == fmt.upper()
    assert raw.status_code == 200 and raw.headers["content-type"] == f"image/{fmt}"
    assert raw.headers["x-seed"] == "3" and raw.headers["x-model-version"] == "1"
    assert float(raw.headers["x-inference-seconds"]) >= 0
    image = Image.open(io.BytesIO(raw.content))
    assert image.format == fmt.upper() and image.size == (64, 64)


async def test_generate_streams_progress_then_the_json_answer(facade: Facade) -> None:
    body = {"prompt": "a red fox in snow", "seed": 11, "num_images": 2, **SMALL}
    r = await facade.http.post("/generate", json=body, headers=SSE)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert [n for n, _ in events] == ["progress"] * 6 + ["image"], events
    progress = [d for n, d in events if n == "progress"]
    for index in (0, 1):
        assert [p["step"] for p in progress if p["image"] == index] == [1, 2, 3]
        assert {p["total"] for p in progress if p["image"] == index} == {3}
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(p["elapsed_s"] >= 0 for p in progress)
    answer = events[-1][1]
    unary = (await facade.http.post("/generate", json=body)).json()
    assert set(answer) == set(unary)
    assert answer["seed"] == 11 and answer["model_version"] == unary["model_version"]
    assert answer["prompt"] == unary["prompt"] and answer["output_format"] == unary["output_format"]
    assert [pixels(x).tolist() for x in answer["images"]] == [pixels(x).tolist() for x in unary["images"]]
    assert decoded(answer["images"][0]).size == (64, 64)
    assert facade.fake.calls["generate_stream"] == 2 and facade.fake.calls["generate"] == 2


# ----------------------------------------------------------------------------- /chat

CHAT = {"width": 64, "height": 64, "steps": 2, "seed": 9}


def by_words(words: dict[str, str]) -> Callable[[str], str]:
    """A fake classifier that labels a text by the first of `words` it contains (else image_request)."""
    return lambda text: next((label for w, label in words.items() if w in text), "image_request")


async def test_chat_image_is_generate_with_the_rewritten_prompt(facade: Facade) -> None:
    chat = await facade.http.post("/chat", json={"message": "make an image of you in Paris", "generate": CHAT})
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["kind"] == "image" and body["classification"]["label"] == "image_request"
    assert set(body["classification"]["scores"]) == {"conversation", "image_request"}
    assert body["classification"]["uncertain"] is False
    image = body["image"]
    assert image["prompt"] == f"{DEPLOYED_TRIGGER}, you in Paris"  # request words gone, trigger words added
    assert len(image["images"]) == 1 and image["seed"] == 9 and image["model_version"]
    direct = (await facade.http.post("/generate", json={"prompt": "you in Paris", **CHAT})).json()
    assert image["images"] == direct["images"]
    chat_params, direct_params = facade.fake.generated
    assert chat_params == direct_params


async def test_conversation_generates_nothing(facade: Facade) -> None:
    facade.fake.label = by_words({"tomorrow": CONVERSATION})
    body = (await facade.http.post("/chat", json={"message": "see you tomorrow", "generate": CHAT})).json()
    assert body["kind"] == "conversation" and body["image"] is None
    assert body["classification"]["label"] == CONVERSATION
    assert facade.fake.calls["generate"] == 0


async def test_uncertain_generates_nothing(facade_with: Callable) -> None:
    # A threshold no answer reaches (the fake is SCORE sure): every classification is uncertain.
    assert SCORE < 1.01
    async with facade_with(classify_threshold=1.01) as f:
        body = (await f.http.post("/chat", json={"message": "make an image of you in Paris", "generate": CHAT})).json()
        assert f.fake.calls["generate"] == 0
    assert body["kind"] == "uncertain" and body["image"] is None
    assert body["classification"]["uncertain"] is True and body["classification"]["label"] == "image_request"


async def test_chat_streams_classification_then_progress_then_image(facade: Facade) -> None:
    r = await facade.http.post(
        "/chat", json={"message": "can I see you in the kitchen?", "generate": CHAT}, headers=SSE
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert [n for n, _ in events] == ["classification", "progress", "progress", "image"], events
    assert events[0][1]["kind"] == "image" and events[0][1]["classification"]["label"] == "image_request"
    assert events[-1][1]["prompt"].endswith("you in the kitchen") and events[-1][1]["seed"] == 9


async def test_chat_stream_for_conversation_is_only_the_classification(facade: Facade) -> None:
    facade.fake.label = by_words({"tomorrow": CONVERSATION})
    r = await facade.http.post("/chat", json={"message": "see you tomorrow"}, headers=SSE)
    events = sse_events(r.text)
    assert [n for n, _ in events] == ["classification"]
    assert events[0][1]["kind"] == "conversation"
    assert facade.fake.calls["generate_stream"] == 0


# ----------------------------------------------------------------------------- /classify and the operational routes


async def test_classify_answers_one_or_many_in_order(facade: Facade) -> None:
    facade.fake.label = by_words({"tomorrow": CONVERSATION})
    one = (await facade.http.post("/classify", json={"text": "make an image of you"})).json()
    assert one["label"] == "image_request" and one["score"] == pytest.approx(one["scores"]["image_request"])
    assert isinstance(one["uncertain"], bool)
    texts = ["make an image of you in Paris", "see you tomorrow", "selfie?"]
    many = (await facade.http.post("/classify", json={"texts": texts})).json()["results"]
    assert [x["label"] for x in many] == ["image_request", CONVERSATION, "image_request"]


async def test_health_ready_metrics_docs(facade: Facade) -> None:
    http = facade.http
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "models": [CLASSIFY.name, GENERATE.name]}
    await http.post("/classify", json={"text": "hello"})
    await http.post("/classify", json={"text": ""})
    await http.get("/no/such/path")
    families = {f.name: f for f in text_string_to_metric_families((await http.get("/metrics")).text)}
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
    calls = [s for s in families["fluxserve_classify_call_texts"].samples if s.name.endswith("_count")]
    assert calls and calls[0].value >= 1  # Triton classify calls, by texts per call
    docs = await http.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    paths = (await http.get("/openapi.json")).json()["paths"]
    assert {"/classify", "/generate", "/chat", "/train", "/healthz", "/readyz", "/metrics"} <= set(paths)
