"""POST /chat through the real facade and Triton: the prototype's messages, classified by the real
classifier, and an image generated for the ones that ask for one. The facade's rules for /chat
(the uncertain and conversation kinds, the rewritten prompt equal to /generate's, the SSE framing,
validation) are checked in-process in tests/unit/facade/test_http_answers.py and test_http_validation.py."""

from __future__ import annotations

import pytest

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
