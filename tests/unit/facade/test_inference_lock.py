"""FLUXSERVE_API_REQUIRE_KEY_FOR_INFERENCE locks every route that runs a model (issue 25's first
check): /classify, /generate and /chat, JSON and SSE, answer 401 to an anonymous caller before any
model runs, and serve a caller with the operator key. In-process, against a fake Triton client."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.unit.facade.harness import SSE

pytestmark = pytest.mark.anyio

SMALL = {"width": 64, "height": 64, "steps": 1}
ROUTES = [
    ("/classify", {"text": "can I see you in the kitchen?"}, {}),
    ("/generate", {"prompt": "a red fox", **SMALL}, {}),
    ("/generate", {"prompt": "a red fox", **SMALL}, SSE),
    ("/chat", {"message": "make an image of a red fox", "generate": SMALL}, {}),
    ("/chat", {"message": "make an image of a red fox", "generate": SMALL}, SSE),
]


@pytest.mark.parametrize(
    ("path", "body", "headers"), ROUTES, ids=[f"{p} {'sse' if h else 'json'}" for p, _, h in ROUTES]
)
async def test_locked_inference_needs_the_key(facade_with: Callable, path: str, body: dict, headers: dict) -> None:
    async with facade_with(require_key_for_inference=True) as f:
        anonymous = await f.anon.post(path, json=body, headers=headers)
        calls_before_key = sum(f.fake.calls[m] for m in ("classify", "generate", "generate_stream"))
        keyed = await f.http.post(path, json=body, headers=headers)
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.headers["www-authenticate"] == "Bearer" and calls_before_key == 0
    assert keyed.status_code == 200, keyed.text
