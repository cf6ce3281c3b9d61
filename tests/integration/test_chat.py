"""POST /chat through the real facade and Triton: one call per chat message, every kind."""

from __future__ import annotations

import pytest

from tests.conftest import start_facade
from tests.integration.test_generate_stream import sse_events

pytestmark = pytest.mark.integration

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 9}
PROTOTYPE = [
    ("make an image of you in Paris", "image", "you in Paris"),
    ("can I see you in the kitchen?", "image", "you in the kitchen"),
    ("see you tomorrow", "conversation", None),
]


@pytest.mark.parametrize(("message", "kind", "prompt"), PROTOTYPE)
def test_prototype_examples(facade, message: str, kind: str, prompt: str | None) -> None:
    with facade.client(300) as http:
        r = http.post("/chat", json={"message": message, "generate": SMALL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == kind, body["classification"]
    cls = body["classification"]
    assert set(cls["scores"]) == {"conversation", "image_request"} and cls["uncertain"] is False
    if kind == "image":
        image = body["image"]
        assert cls["label"] == "image_request"
        assert image["prompt"].endswith(prompt)  # trigger words may be prepended, request words are gone
        assert len(image["images"]) == 1 and image["seed"] == 9 and image["model_version"]
    else:
        assert cls["label"] == "conversation" and body["image"] is None


def test_chat_image_equals_generate_with_the_rewritten_prompt(facade) -> None:
    with facade.client(300) as http:
        chat = http.post("/chat", json={"message": "make an image of you in Paris", "generate": SMALL}).json()
        direct = http.post("/generate", json={"prompt": "you in Paris", **SMALL}).json()
    assert chat["image"]["images"] == direct["images"]


def test_uncertain_generates_nothing(triton) -> None:
    # A threshold no answer reaches: every classification is uncertain.
    f = start_facade(triton.grpc_url, {"FLUXSERVE_API_CLASSIFY_THRESHOLD": "1.01"})
    try:
        with f.client(60) as http:
            body = http.post("/chat", json={"message": "make an image of you in Paris", "generate": SMALL}).json()
    finally:
        f.stop()
    assert body["kind"] == "uncertain" and body["image"] is None
    assert body["classification"]["uncertain"] is True and body["classification"]["label"] == "image_request"


def test_chat_streams_classification_then_progress_then_image(facade) -> None:
    with (
        facade.client(300) as http,
        http.stream(
            "POST",
            "/chat",
            json={"message": "can I see you in the kitchen?", "generate": SMALL},
            headers={"accept": "text/event-stream"},
        ) as r,
    ):
        assert r.status_code == 200
        events = list(sse_events(r))
    names = [n for n, _ in events]
    assert names == ["classification", "progress", "progress", "image"], names
    assert events[0][1]["kind"] == "image" and events[0][1]["classification"]["label"] == "image_request"
    assert events[-1][1]["prompt"].endswith("you in the kitchen")


def test_chat_stream_for_conversation_is_only_the_classification(facade) -> None:
    with (
        facade.client(60) as http,
        http.stream(
            "POST", "/chat", json={"message": "see you tomorrow"}, headers={"accept": "text/event-stream"}
        ) as r,
    ):
        events = list(sse_events(r))
    assert [n for n, _ in events] == ["classification"]
    assert events[0][1]["kind"] == "conversation"


@pytest.mark.parametrize(
    "body",
    [
        {"message": ""},
        {"message": "hi", "generate": {"width": 65}},
        {"message": "hi", "generate": {"prompt": "not allowed here"}},
        {"text": "wrong field"},
    ],
)
def test_bad_chat_requests_get_the_envelope(facade, body: dict) -> None:
    with facade.client() as http:
        r = http.post("/chat", json=body)
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "invalid_request"
