"""POST /train refuses what it cannot take before reading the body, in-process (httpx.ASGITransport
against api.app.create_app, a real SQLite job store in a temp folder, no worker process: a test
heartbeats for one). The request bodies are generators that count what the facade pulled, so
"refused before it was read" is observed, not inferred."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from starlette.requests import ClientDisconnect

from api.app import create_app
from api.settings import ApiSettings
from api.state import AppState
from api.upload import MAX_PART_HEADER_BYTES, MAX_PART_HEADERS

pytestmark = pytest.mark.anyio

KEY = secrets.token_hex(24)
AUTH = {"Authorization": f"Bearer {KEY}"}
BOUNDARY = "fluxserveTestBoundary"
STORE_FILES = {
    "jobs.sqlite",
    "jobs.sqlite-wal",
    "jobs.sqlite-shm",
    "queue.sqlite",
    "queue.sqlite-wal",
    "queue.sqlite-shm",
}


def _part(name: str, value: str, extra_headers: tuple[str, ...] = ()) -> bytes:
    head = "".join(f"{h}\r\n" for h in (f'Content-Disposition: form-data; name="{name}"', *extra_headers))
    return f"--{BOUNDARY}\r\n{head}\r\n{value}\r\n".encode()


def classifier_form(*parts: bytes) -> bytes:
    """A multipart classifier job (no file, publish off): valid unless `parts` spoil it."""
    fields = [_part("kind", "classifier"), _part("steps", "1"), _part("publish", "false")]
    return b"".join([*fields, *parts, f"--{BOUNDARY}--\r\n".encode()])


class Body:
    """A request body sent in chunks, recording how many the server pulled; `gate` (if set) holds
    the chunks after the first until it is set."""

    def __init__(self, data: bytes, chunk: int = 64, gate: asyncio.Event | None = None) -> None:
        self.chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        self.gate = gate
        self.pulled = 0
        self.first_pulled = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if i == 1 and self.gate is not None:
                await self.gate.wait()
            self.pulled += 1
            self.first_pulled.set()
            yield chunk


async def vanish_mid_upload(app: FastAPI, first: bytes) -> None:
    """What the server passes on when a client disconnects after `first`: ASGI `http.disconnect`."""
    messages = [{"type": "http.request", "body": first, "more_body": True}, {"type": "http.disconnect"}]
    headers = {"host": "127.0.0.1", "content-type": f"multipart/form-data; boundary={BOUNDARY}", **AUTH}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/train",
        "raw_path": b"/train",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        pass

    try:
        await app(scope, receive, send)
    except ClientDisconnect:
        pass  # uvicorn logs it; the caller is gone either way


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FastAPI]:
    monkeypatch.setenv("FLUXSERVE_JOBS_JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("FLUXSERVE_JOBS_MAX_QUEUED_JOBS", "3")
    monkeypatch.delenv("FLUXSERVE_JOBS_REDIS_URL", raising=False)
    yield create_app(ApiSettings(keys=SecretStr(f"ops:{KEY}"), key_file=tmp_path / "no-key-file"))


def state_of(app: FastAPI) -> AppState:
    return app.state.fluxserve


def worker_alive(app: FastAPI) -> None:
    state_of(app).jobs.heartbeat("test-worker")


def jobs_dir_entries(app: FastAPI) -> set[str]:
    folder = state_of(app).job_settings.jobs_dir
    return {p.name for p in folder.iterdir()} - STORE_FILES if folder.exists() else set()


async def post(app: FastAPI, body: Body, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return await client.post(
            "/train",
            content=body,
            headers={
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                **(AUTH if headers is None else headers),
            },
        )


def assert_refused_unread(r: httpx.Response, body: Body, status: int, kind: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind
    assert int(r.headers["Retry-After"]) >= 1
    assert body.pulled == 0, f"the facade read {body.pulled} chunk(s) of a body it refused"


async def test_an_anonymous_caller_gets_401_not_the_queue_state(app: FastAPI) -> None:
    for headers in ({}, {"Authorization": "Bearer " + "x" * 32}):
        body = Body(classifier_form())
        r = await post(app, body, headers)
        assert r.status_code == 401 and body.pulled == 0, r.text  # no worker is alive: still 401, not 503
        assert "worker" not in r.text and "queue" not in r.text


async def test_no_worker_refused_before_the_body_is_read(app: FastAPI) -> None:
    body = Body(classifier_form())
    assert_refused_unread(await post(app, body), body, 503, "no_worker")
    assert jobs_dir_entries(app) == set() and state_of(app).jobs.list() == []


async def test_full_queue_refused_before_the_body_is_read(app: FastAPI) -> None:
    worker_alive(app)
    for _ in range(3):
        r = await post(app, Body(classifier_form()))
        assert r.status_code == 202, r.text
    body = Body(classifier_form())
    assert_refused_unread(await post(app, body), body, 503, "queue_full")
    assert len(state_of(app).jobs.list()) == 3


async def test_low_disk_refused_with_507_before_the_body_is_read(app: FastAPI) -> None:
    worker_alive(app)
    state_of(app).settings.min_free_disk_mb = 1 << 40  # more than any disk has free
    body = Body(classifier_form())
    assert_refused_unread(await post(app, body), body, 507, "insufficient_storage")
    assert jobs_dir_entries(app) == set()
    state_of(app).settings.min_free_disk_mb = 0
    assert (await post(app, Body(classifier_form()))).status_code == 202


async def test_concurrent_uploads_are_capped_and_slots_come_back(app: FastAPI) -> None:
    worker_alive(app)
    state = state_of(app)
    state.settings.max_concurrent_uploads = 1
    gate = asyncio.Event()
    slow = Body(classifier_form(), gate=gate)
    first = asyncio.create_task(post(app, slow))
    await asyncio.wait_for(slow.first_pulled.wait(), 10)  # the first upload is streaming
    body = Body(classifier_form())
    assert_refused_unread(await post(app, body), body, 503, "too_many_uploads")
    gate.set()
    assert (await first).status_code == 202
    assert state.uploads.in_flight == 0

    # Every way out frees the slot: a refused body (4xx), a client that vanished mid-upload.
    bad = await post(app, Body(classifier_form(_part("steps", "1"))))
    assert bad.status_code == 422 and "twice" in bad.json()["error"]["message"]
    await vanish_mid_upload(app, classifier_form()[:100])
    assert state.uploads.in_flight == 0
    assert (await post(app, Body(classifier_form()))).status_code == 202
    assert jobs_dir_entries(app) == set()  # classifier jobs keep no upload; the broken ones left nothing


@pytest.mark.parametrize(
    "extra",
    [
        # Each line is within the parser's per-line limit; together they are not.
        tuple(f"X-Pad-{i}: {'a' * (MAX_PART_HEADER_BYTES // 3)}" for i in range(4)),
        (f"X-Pad: {'a' * (4 * MAX_PART_HEADER_BYTES)}",),  # one line over the limit
        tuple(f"X-Pad-{i}: a" for i in range(MAX_PART_HEADERS + 1)),  # too many headers
    ],
    ids=["long-in-total", "one-long-line", "too-many"],
)
async def test_part_headers_are_capped(app: FastAPI, extra: tuple[str, ...]) -> None:
    worker_alive(app)
    # The spoiled part comes first, so a refusal on its headers leaves the rest of the body unread.
    body = Body(_part("trigger_word", "zxq", extra) + classifier_form())
    r = await post(app, body)
    assert r.status_code == 400, r.text
    assert "header" in r.json()["error"]["message"].lower()
    assert body.pulled < len(body.chunks), "the whole body was read before the refusal"  # refused as it arrived
    assert jobs_dir_entries(app) == set() and state_of(app).jobs.list() == []
