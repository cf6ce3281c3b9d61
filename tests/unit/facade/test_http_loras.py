"""Adapters (issue 27) at the facade, in-process: GET/DELETE /loras against a real adapter store in
a temporary folder, and /generate and /chat naming an adapter with the fake Triton behind them:
an unknown name is a 404 naming it before any model runs (also when Triton is the one that finds
it missing), a bad name or scale a 422, the answer says which adapter and hash made the image, the
prompt is led by the adapter's trigger words, and the operator key rules hold."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import numpy as np
import pytest

from common.adapter_store import RECORD_FILE, AdapterRecord, adapters_dir, utc_now_iso, write_adapter
from contract.specs import IMAGE_REQUEST, LABELS
from tests.unit.facade.fake_triton import FakeTriton
from tests.unit.facade.harness import KEY, SSE, Facade, sse_events

pytestmark = pytest.mark.anyio

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 5}
CONVERSATION = next(label for label in LABELS if label != IMAGE_REQUEST)
WRONG_KEY = {"Authorization": "Bearer " + "w" * 40}


def publish(facade: Facade, name: str, trigger_words: str = "zxq", scale: float = 1.0, serve: bool = True) -> str:
    """Adapter `name` in the facade's adapter store (and, when `serve`, known to the fake Triton);
    returns its sha256."""
    sha = write_test_adapter(store(facade), name, trigger_words, scale)
    if serve:
        facade.fake.adapters[name] = sha
    return sha


def write_test_adapter(root: Path, name: str, trigger_words: str = "zxq", scale: float = 1.0) -> str:
    """Adapter `name` (one small layer) in the adapter store at `root`; returns its sha256."""
    lora = root.parent / f"{name}.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    lora.write_bytes(name.encode() * 16)
    sha = hashlib.sha256(lora.read_bytes()).hexdigest()
    record = AdapterRecord(
        name=name,
        trigger_words=trigger_words,
        rank=4,
        scale=scale,
        owner="alice",
        base_fingerprint="f" * 16,
        sha256=sha,
        created=utc_now_iso(),
        layers=1,
        tensor_bytes=2 * 8 * 4 * 4,
        source=str(lora),
    )
    write_adapter(root, record, {"block.0.attn.to_q": (np.zeros((8, 4)), np.zeros((4, 8)))}, lora)
    return sha


def store(facade: Facade) -> Path:
    return adapters_dir(facade.state.job_settings.model_repository)


# ----------------------------------------------------------------------------- GET / DELETE /loras


async def test_list_shows_every_adapter_without_server_paths(facade: Facade) -> None:
    r = await facade.http.get("/loras")
    assert r.status_code == 200 and r.json() == {"loras": []}
    sha = publish(facade, "my-dog", trigger_words="sks dog", scale=0.8)
    publish(facade, "watercolour")
    r = await facade.http.get("/loras")
    assert r.status_code == 200, r.text
    loras = r.json()["loras"]
    assert [a["name"] for a in loras] == ["my-dog", "watercolour"]
    dog = loras[0]
    assert dog | {"created": "-"} == {
        "name": "my-dog",
        "trigger_words": "sks dog",
        "rank": 4,
        "scale": 0.8,
        "owner": "alice",
        "created": "-",
        "sha256": sha,
        "tensor_bytes": 256,
    }
    assert dog["created"].endswith("+00:00")
    assert str(store(facade).parent) not in r.text  # the record's source path stays on the server
    one = await facade.http.get("/loras/my-dog")
    assert one.status_code == 200 and one.json() == dog


async def test_unknown_and_bad_names(facade: Facade) -> None:
    r = await facade.http.get("/loras/nobody")
    assert r.status_code == 404 and r.json()["error"] == {"type": "not_found", "message": "no adapter named 'nobody'"}
    for bad in ("My-Dog", "-dog", "x" * 65, "dog.v2", "%2E%2E", "d%C3%B6g"):
        r = await facade.http.get(f"/loras/{bad}")
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["type"] == "invalid_request" and "adapter name" in r.json()["error"]["message"]
        r = await facade.http.delete(f"/loras/{bad}")
        assert r.status_code == 422, (bad, r.text)


async def test_a_path_outside_the_store_is_never_reached(facade: Facade) -> None:
    outside = store(facade).parent / "victim"
    (outside / "x").mkdir(parents=True)
    for path in ("/loras/..%2Fvictim", "/loras/%2E%2E", "/loras/..%2f..%2fetc"):
        r = await facade.http.delete(path)
        assert r.status_code in (404, 422), (path, r.text)
    assert (outside / "x").is_dir()


async def test_delete_needs_the_operator_key_and_removes_the_adapter(facade: Facade) -> None:
    publish(facade, "my-dog")
    for client, headers in ((facade.anon, {}), (facade.anon, WRONG_KEY)):
        r = await client.delete("/loras/my-dog", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    assert (store(facade) / "my-dog").is_dir()
    r = await facade.http.delete("/loras/my-dog")
    assert r.status_code == 200 and r.json()["name"] == "my-dog"
    assert not (store(facade) / "my-dog").exists()
    assert (await facade.http.get("/loras")).json() == {"loras": []}
    r = await facade.http.delete("/loras/my-dog")
    assert r.status_code == 404 and "my-dog" in r.json()["error"]["message"]
    # Deleted means unknown to requests from now on.
    r = await facade.http.post("/generate", json={"prompt": "a dog", "lora": "my-dog", **SMALL})
    assert r.status_code == 404 and facade.fake.calls["generate"] == 0


async def test_a_damaged_adapter_is_deleted_by_name(facade: Facade) -> None:
    publish(facade, "broken")
    (store(facade) / "broken" / RECORD_FILE).write_text("{")
    assert (await facade.http.get("/loras/broken")).status_code == 422
    r = await facade.http.delete("/loras/broken")
    assert r.status_code == 200 and r.json()["name"] == "broken", r.text
    assert not (store(facade) / "broken").exists()
    assert (await facade.http.get("/loras/broken")).status_code == 404


async def test_listing_needs_the_operator_key_as_reading_jobs_does(facade: Facade) -> None:
    publish(facade, "my-dog")
    for path in ("/loras", "/loras/my-dog", "/loras/nobody"):
        r = await facade.anon.get(path)
        assert r.status_code == 401, (path, r.text)
        assert "my-dog" not in r.text


# ----------------------------------------------------------------------------- /generate naming one


async def test_generate_with_an_adapter_says_which_made_the_image(facade: Facade) -> None:
    sha = publish(facade, "my-dog", trigger_words="sks dog", scale=0.8)
    r = await facade.anon.post("/generate", json={"prompt": "on a beach", "lora": "my-dog", **SMALL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["lora"] == {"name": "my-dog", "sha256": sha, "scale": 0.8}
    # Led by the adapter's trigger words, not the default LoRA's.
    assert body["prompt"] == "sks dog, on a beach"
    (sent,) = facade.fake.generated
    assert (sent.lora, sent.lora_scale, sent.prompt) == ("my-dog", None, "sks dog, on a beach")

    # A prompt that has the words already (any case) keeps them as they are; scale 0 is a scale.
    r = await facade.anon.post(
        "/generate", json={"prompt": "Sks Dog on a beach", "lora": "my-dog", "lora_scale": 0, **SMALL}
    )
    assert r.status_code == 200 and r.json()["lora"]["scale"] == 0 and r.json()["prompt"] == "Sks Dog on a beach"
    assert facade.fake.generated[-1].lora_scale == 0


async def test_adapter_trigger_words_lead_whatever_the_default_rule(
    facade_with: Callable[..., AbstractAsyncContextManager[Facade]],
) -> None:
    """`generate` leads an adapter request's prompt with its words anyway: the answer says so even
    when this facade adds none of the default LoRA's."""
    async with facade_with(add_trigger_word=False) as f:
        publish(f, "my-dog", trigger_words="sks dog")
        named = await f.anon.post("/generate", json={"prompt": "on a beach", "lora": "my-dog", **SMALL})
        assert named.json()["prompt"] == "sks dog, on a beach" == f.fake.generated[-1].prompt
        plain = await f.anon.post("/generate", json={"prompt": "on a beach", **SMALL})
        assert plain.json()["prompt"] == "on a beach"


async def test_generate_without_an_adapter_is_unchanged(facade: Facade) -> None:
    r = await facade.anon.post("/generate", json={"prompt": "a fox", **SMALL})
    assert r.status_code == 200 and r.json()["lora"] is None
    assert facade.fake.generated[-1].lora is None


async def test_raw_image_answer_names_the_adapter(facade: Facade) -> None:
    sha = publish(facade, "my-dog")
    r = await facade.anon.post(
        "/generate", json={"prompt": "x", "lora": "my-dog", **SMALL}, headers={"Accept": "image/png"}
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert (r.headers["x-lora"], r.headers["x-lora-sha256"]) == ("my-dog", sha)
    plain = await facade.anon.post("/generate", json={"prompt": "x", **SMALL}, headers={"Accept": "image/png"})
    assert "x-lora" not in plain.headers


async def test_unknown_adapter_is_404_naming_it_before_any_model_runs(facade: Facade) -> None:
    r = await facade.anon.post("/generate", json={"prompt": "a dog", "lora": "nobody", **SMALL})
    assert r.status_code == 404, r.text
    assert r.json()["error"] == {"type": "not_found", "message": "no adapter named 'nobody'"}
    # Streamed: one `error` event, the same envelope, nothing before it.
    r = await facade.anon.post("/generate", json={"prompt": "a dog", "lora": "nobody", **SMALL}, headers=SSE)
    assert sse_events(r.text) == [("error", {"error": {"type": "not_found", "message": "no adapter named 'nobody'"}})]
    assert facade.fake.calls["generate"] == facade.fake.calls["generate_stream"] == 0


async def test_adapter_gone_by_the_time_triton_runs_is_still_404_naming_it(facade: Facade) -> None:
    publish(facade, "my-dog", serve=False)  # in the store, but Triton finds no such adapter
    for headers in ({}, SSE):
        r = await facade.anon.post("/generate", json={"prompt": "x", "lora": "my-dog", **SMALL}, headers=headers)
        error = r.json()["error"] if not headers else sse_events(r.text)[-1][1]["error"]
        assert error == {"type": "not_found", "message": "no adapter named 'my-dog'"}, r.text
        assert r.status_code == (404 if not headers else 200)


async def test_the_hash_is_what_triton_served(facade: Facade) -> None:
    """Deleted and published again under the same name between the lookup and the model: the answer
    carries the hash of the adapter that made the image."""
    publish(facade, "my-dog")
    facade.fake.adapters["my-dog"] = "0" * 64
    r = await facade.anon.post("/generate", json={"prompt": "x", "lora": "my-dog", **SMALL})
    assert r.status_code == 200 and r.json()["lora"]["sha256"] == "0" * 64


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"lora": "My Dog"}, "lora"),
        ({"lora": ""}, "lora"),
        ({"lora": "../dog"}, "lora"),
        ({"lora": "x" * 65}, "lora"),
        ({"lora": 7}, "lora"),
        ({"lora": "my-dog", "lora_scale": 2.01}, "lora_scale"),
        ({"lora": "my-dog", "lora_scale": -0.1}, "lora_scale"),
        ({"lora": "my-dog", "lora_scale": "1e309"}, "lora_scale"),
        ({"lora": "my-dog", "lora_scale": "strong"}, "lora_scale"),
    ],
)
async def test_bad_adapter_options_are_422_naming_the_field(facade: Facade, options: dict, field: str) -> None:
    publish(facade, "my-dog")
    for path, body in (
        ("/generate", {"prompt": "x", **SMALL, **options}),
        ("/chat", {"message": "send me a selfie", "generate": {**SMALL, **options}}),
    ):
        r = await facade.anon.post(path, json=body)
        assert r.status_code == 422, (path, r.text)
        assert field in r.json()["error"]["message"], r.text
    assert facade.fake.calls["generate"] == facade.fake.calls["classify"] == 0


# ----------------------------------------------------------------------------- /chat naming one


async def test_chat_with_an_adapter(facade: Facade) -> None:
    sha = publish(facade, "my-dog", trigger_words="sks dog")
    r = await facade.anon.post("/chat", json={"message": "send me a selfie", "generate": {**SMALL, "lora": "my-dog"}})
    assert r.status_code == 200, r.text
    image = r.json()["image"]
    assert image["lora"] == {"name": "my-dog", "sha256": sha, "scale": 1.0}
    assert image["prompt"].startswith("sks dog, ")
    r = await facade.anon.post(
        "/chat", json={"message": "send me a selfie", "generate": {**SMALL, "lora": "my-dog"}}, headers=SSE
    )
    kinds = [name for name, _ in sse_events(r.text)]
    assert kinds[0] == "classification" and kinds[-1] == "image"
    assert sse_events(r.text)[-1][1]["lora"]["name"] == "my-dog"


async def test_chat_naming_an_unknown_adapter_is_refused_before_it_is_classified(facade: Facade) -> None:
    facade.fake.label = lambda text: CONVERSATION  # it would not even generate
    body = {"message": "see you tomorrow", "generate": {**SMALL, "lora": "nobody"}}
    r = await facade.anon.post("/chat", json=body)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no adapter named 'nobody'"
    r = await facade.anon.post("/chat", json=body, headers=SSE)
    assert [name for name, _ in sse_events(r.text)] == ["error"]
    assert sse_events(r.text)[0][1]["error"]["type"] == "not_found"
    assert facade.fake.calls["classify"] == 0 and facade.fake.calls["generate"] == 0


# ----------------------------------------------------------------------------- inference locked


async def test_locked_inference_answers_401_before_saying_whether_an_adapter_exists(
    facade_with: Callable[..., AbstractAsyncContextManager[Facade]], fake: FakeTriton
) -> None:
    async with facade_with(require_key_for_inference=True) as f:
        sha = publish(f, "my-dog")
        for name in ("my-dog", "nobody"):
            for path, body in (
                ("/generate", {"prompt": "x", "lora": name, **SMALL}),
                ("/chat", {"message": "send me a selfie", "generate": {**SMALL, "lora": name}}),
            ):
                r = await f.anon.post(path, json=body)
                assert r.status_code == 401 and name not in r.text, (path, r.text)
        assert fake.calls["generate"] == fake.calls["classify"] == 0
        r = await f.http.post("/generate", json={"prompt": "x", "lora": "nobody", **SMALL})
        assert r.status_code == 404
        r = await f.http.post("/generate", json={"prompt": "x", "lora": "my-dog", **SMALL})
        assert r.status_code == 200 and r.json()["lora"]["sha256"] == sha
        image = base64.b64decode(r.json()["images"][0])
        assert image.startswith(b"\x89PNG")
        r = await f.anon.get("/loras")
        assert r.status_code == 401
        r = await f.http.get("/loras", headers={"Authorization": f"Bearer {KEY}"})
        assert [a["name"] for a in r.json()["loras"]] == ["my-dog"]
