"""What the facade refuses as invalid, with the error envelope (422 `invalid_request` and a message
naming the field), before any model runs: /classify, /generate (JSON, raw, SSE), /chat and the
query and form bounds of /train. In-process against a fake Triton (tests/unit/facade/harness.py);
moved here from the real-facade tests (tests/integration: test_facade_classify, test_generate,
test_generate_stream, test_chat, test_hostile_input, test_training_api)."""

from __future__ import annotations

import pytest

from contract.specs import CLASSIFY_LIMITS
from tests.unit.facade.harness import SSE, Facade

pytestmark = pytest.mark.anyio

SMALL = {"width": 64, "height": 64, "steps": 3}
MODEL_CALLS = ("classify", "generate", "generate_stream")


def assert_no_model_ran(facade: Facade) -> None:
    assert not any(facade.fake.calls[m] for m in MODEL_CALLS), facade.fake.calls


def assert_invalid(r, fragment: str) -> None:
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request", err
    assert fragment in err["message"], err
    assert "Traceback" not in r.text


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
async def test_bad_classify_input_is_422_with_message(facade: Facade, body: dict, fragment: str) -> None:
    assert_invalid(await facade.http.post("/classify", json=body), fragment)
    assert_no_model_ran(facade)


@pytest.mark.parametrize("path", ["/classify", "/generate", "/chat"])
async def test_malformed_json_is_422_with_the_envelope(facade: Facade, path: str) -> None:
    r = await facade.http.post(path, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request" and r.json()["error"]["message"]
    assert_no_model_ran(facade)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "width": 100}, "width"),
        ({"prompt": "x", "height": 8}, "height"),
        ({"prompt": "x", "width": 4096}, "width"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "steps": 101}, "steps"),
        ({"prompt": "x", "guidance": -1}, "guidance"),
        ({"prompt": "x", "num_images": 0}, "num_images"),
        ({"prompt": "x", "num_images": 99}, "num_images"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "seed": -5}, "seed"),
        ({"width": 64}, "prompt"),
        ({"prompt": "x", "seed": 2**63 - 1, "num_images": 2}, "seed"),
        ({"prompt": "x", "seed": 2**63}, "seed"),
    ],
)
@pytest.mark.parametrize("accept", ["json", "sse"])
async def test_bad_generate_input_is_422(facade: Facade, body: dict, fragment: str, accept: str) -> None:
    """Refused the same way whether the answer would have been JSON or a stream."""
    r = await facade.http.post("/generate", json=body, headers=SSE if accept == "sse" else {})
    assert_invalid(r, fragment)
    assert_no_model_ran(facade)


async def test_stream_refuses_bad_input_with_the_envelope_not_a_stream(facade: Facade) -> None:
    r = await facade.http.post("/generate", json={"prompt": "x", "width": 65}, headers=SSE)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["type"] == "invalid_request" and "width" in r.json()["error"]["message"]


async def test_raw_accept_with_several_images_is_422(facade: Facade) -> None:
    r = await facade.http.post(
        "/generate", json={"prompt": "x", **SMALL, "num_images": 2}, headers={"Accept": "image/png"}
    )
    assert_invalid(r, "one image")
    assert_no_model_ran(facade)


@pytest.mark.parametrize(
    "body",
    [
        {"message": ""},
        {"message": "hi", "generate": {"width": 65}},
        {"message": "hi", "generate": {"prompt": "not allowed here"}},
        {"text": "wrong field"},
    ],
)
async def test_bad_chat_requests_get_the_envelope(facade: Facade, body: dict) -> None:
    r = await facade.http.post("/chat", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request"
    assert_no_model_ran(facade)


@pytest.mark.parametrize(
    ("path", "params", "fragment"),
    [
        ("/train", {"limit": "252893660392803830821802478690893824"}, "limit"),
        ("/train", {"limit": "-10000000000000000000"}, "limit"),
        ("/train", {"limit": "0"}, "limit"),
        ("/train/x/events", {"poll_s": "0"}, "poll_s"),
        ("/train/x/events", {"poll_s": "nan"}, "poll_s"),
        ("/train/x/events", {"poll_s": "inf"}, "poll_s"),
    ],
)
async def test_train_query_parameters_are_bounded(facade: Facade, path: str, params: dict, fragment: str) -> None:
    assert_invalid(await facade.http.get(path, params=params), fragment)
