"""POST /train and the other /train routes as a caller meets them, in-process (a real SQLite job
store in a temporary folder, a test heartbeating for the worker, no worker process, so a queued
job stays queued): the operator key on every route, hostile and bad datasets refused with a 4xx
and nothing left behind, and the form's bounds. Moved here from tests/integration
(test_hostile_input, and test_training_api's dataset and field refusals), which sent the same
requests to a facade process."""

from __future__ import annotations

import base64
import io
import logging
import struct
import tempfile
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from PIL import Image

from tests.unit.facade.harness import KEY, KEY_NAME, Facade, running_facade, sse_events

pytestmark = pytest.mark.anyio

MiB = 1 << 20
UPLOAD_LIMIT = 16 * MiB
STORE_FILES = {f"{name}.sqlite{suffix}" for name in ("jobs", "queue") for suffix in ("", "-wal", "-shm")}
TRIGGER = "zxq"


class Train:
    """The facade, its jobs folder, and the temp folder uploads must never spool into."""

    def __init__(self, facade: Facade, spool: Path) -> None:
        self.facade, self.spool = facade, spool
        self.jobs_dir = facade.state.job_settings.jobs_dir

    def worker_alive(self) -> None:
        self.facade.state.jobs.heartbeat("test-worker")

    def job_ids(self) -> list[str]:
        return [j.id for j in self.facade.state.jobs.list(limit=1000)]

    def on_disk(self) -> set[str]:
        return {p.name for p in self.jobs_dir.iterdir()} - STORE_FILES if self.jobs_dir.exists() else set()

    def assert_nothing_left(self, ids_before: list[str], disk_before: set[str]) -> None:
        assert self.job_ids() == ids_before
        assert self.on_disk() == disk_before
        assert not any(self.spool.iterdir()), list(self.spool.iterdir())


@pytest.fixture
async def train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Train]:
    monkeypatch.setenv("FLUXSERVE_JOBS_MAX_UPLOAD_BYTES", str(UPLOAD_LIMIT))
    spool = tmp_path / "spool"  # where Python and Starlette would spool uploads: it must stay empty
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    async with running_facade() as f:
        t = Train(f, spool)
        t.worker_alive()
        yield t


def png(size: int = 32) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(b, format="PNG")
    return b.getvalue()


def zipped(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def gigabyte_of_zeros() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("ok.png", png())
        with zf.open("zeros.png", "w", force_zip64=True) as fh:
            block = b"\0" * (16 * MiB)
            for _ in range(64):
                fh.write(block)
    return buf.getvalue()


def huge_png(side: int = 20000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side pixels (about 50 KB: its rows are all zero)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(rows.compress(row) for _ in range(side)) + rows.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def dataset(payload: bytes) -> dict:
    return {"dataset": ("d.zip", payload, "application/zip")}


# ----------------------------------------------------------------------------- the operator key

WRONG = [
    ("no key", {}),
    ("wrong key", {"Authorization": "Bearer " + "x" * 40}),
    ("basic auth", {"Authorization": "Basic " + base64.b64encode(f"operator:{KEY}".encode()).decode()}),
]


async def test_every_train_route_needs_the_key(train: Train, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    r = await train.facade.http.post("/train", data={"kind": "classifier", "steps": "1", "publish": "false"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    before_ids, before_disk = train.job_ids(), train.on_disk()
    calls = [
        ("POST", "/train", {"data": {"trigger_word": TRIGGER}, "files": dataset(zipped({"a.png": png()}))}),
        ("GET", "/train", {}),
        ("GET", f"/train/{job_id}", {}),
        ("DELETE", f"/train/{job_id}", {}),
        ("GET", f"/train/{job_id}/events", {}),
    ]
    # Five routes, three wrong ways each; a missing key is no guess, so the ten wrong ones stay within
    # the wrong-key burst (api/auth_limit.py) and all are 401.
    async with train.facade.client(client=("10.1.2.3", 40000)) as http:
        for method, path, kwargs in calls:
            for label, headers in WRONG:
                r = await http.request(method, path, headers=headers, **kwargs)
                assert r.status_code == 401, (method, path, label, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]["type"] == "unauthorized"
                assert KEY not in r.text
    assert train.job_ids() == before_ids and train.on_disk() == before_disk
    job = (await train.facade.http.get(f"/train/{job_id}")).json()
    assert job["status"] == "queued" and not job["cancel_requested"] and job["owner"] == KEY_NAME
    assert KEY not in caplog.text


# ----------------------------------------------------------------------------- hostile and bad datasets

HOSTILE: dict[str, Callable[[], bytes]] = {
    "zip-slip": lambda: zipped({"../../escape.png": png()}),
    "absolute": lambda: zipped({"/tmp/fluxserve-escape.png": png()}),
    "windows-path": lambda: zipped({"C:\\..\\..\\escape.png": png()}),
    "symlink": lambda: zipped({"ok.png": png()}, symlink="link.png"),
    "1gb-of-zeros": gigabyte_of_zeros,
    "20000x20000-png": lambda: zipped({"huge.png": huge_png()}),
    "html-as-jpg": lambda: zipped({"photo.jpg": b"<html><script>alert(1)</script></html>"}),
    "not-a-zip": lambda: b"%PDF-1.4 this is not a zip",
    "empty-zip": lambda: zipped({}),
    "5000-tiny-files": lambda: zipped({f"f{i}.png": b"x" for i in range(5000)}),
    "nested-zip": lambda: zipped({"inner.zip": zipped({"a.png": png()}), "b.png.zip": zipped({"c.png": png()})}),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_dataset_refused(train: Train, tmp_path: Path, case: str) -> None:
    payload = HOSTILE[case]()
    before_ids, before_disk = train.job_ids(), train.on_disk()
    r = await train.facade.http.post("/train", data={"trigger_word": TRIGGER}, files=dataset(payload))
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["type"] in ("invalid_dataset", "invalid_request") and r.json()["error"]["message"]
    train.assert_nothing_left(before_ids, before_disk)
    assert not (tmp_path.parent / "escape.png").exists() and not Path("/tmp/fluxserve-escape.png").exists()
    assert not any(tmp_path.rglob("*escape.png"))


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"this is not a zip", 415),
        (zipped({"notes.txt": b"hello"}), 422),
        (zipped({"broken.png": b"\x89PNG\r\n\x1a\n garbage"}), 422),
        (zipped({"../escape.png": png()}), 422),
        (zipped({"/abs.png": png()}), 422),
        (zipped({"ok.png": png()}, symlink="link.png"), 422),
        (zipped({"ok.png": png(), "bomb.png": b"\0" * (50 << 20)}), 422),
        (zipped({f"{i}.png": png() for i in range(250)}), 422),
    ],
    ids=["not-zip", "no-images", "corrupt-image", "dotdot", "absolute", "symlink", "bomb", "too-many"],
)
async def test_bad_datasets_refused_with_their_status(train: Train, payload: bytes, status: int) -> None:
    before_ids, before_disk = train.job_ids(), train.on_disk()
    r = await train.facade.http.post("/train", data={"trigger_word": TRIGGER}, files=dataset(payload))
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    train.assert_nothing_left(before_ids, before_disk)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"trigger_word": ""}, "trigger"),
        ({"steps": "0"}, "steps"),
        ({"rank": "1000"}, "rank"),
        ({"resolution": "100"}, "resolution"),
        ({"kind": "other"}, "kind"),
    ],
)
async def test_bad_lora_fields_refused(train: Train, fields: dict, fragment: str) -> None:
    before_ids, before_disk = train.job_ids(), train.on_disk()
    files = dataset(zipped({"a.png": png(64)}))
    r = await train.facade.http.post("/train", data={"trigger_word": TRIGGER, **fields}, files=files)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"]["message"]
    train.assert_nothing_left(before_ids, before_disk)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"steps": "0"}, "allowed range [1, 50]"),
        ({"steps": str(10**8)}, "allowed range [1, 50]"),
        ({"batch_size": "0"}, "batch_size"),
        ({"learning_rate": "1000"}, "learning_rate"),
        ({"learning_rate": "nan"}, "learning_rate"),
        ({"seed": str(2**64)}, "seed"),
    ],
)
async def test_classifier_fields_are_bounded(train: Train, fields: dict, fragment: str) -> None:
    before = train.job_ids()
    r = await train.facade.http.post("/train", data={"kind": "classifier", **fields})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request" and fragment in r.json()["error"]["message"]
    assert train.job_ids() == before


# ----------------------------------------------------------------------------- the job routes


async def submit_classifier(train: Train) -> str:
    r = await train.facade.http.post("/train", data={"kind": "classifier", "steps": "1", "publish": "false"})
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    return r.json()["job_id"]


async def test_cancel_answers_by_the_jobs_state(train: Train) -> None:
    """A queued job is cancelled at once; a running one is flagged; a publishing one, a finished
    one and an unknown id are refused with the envelope (409, 409, 404)."""
    http, store = train.facade.http, train.facade.state.jobs
    queued, running, publishing = [await submit_classifier(train) for _ in range(3)]
    for job_id in (running, publishing):
        assert store.start(job_id, "test-worker")
    assert store.begin_publish(publishing)

    cancelled = await http.delete(f"/train/{queued}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = await http.delete(f"/train/{queued}")
    assert again.status_code == 409 and again.json()["error"] == {
        "type": "conflict",
        "message": "job already cancelled",
    }
    flagged = await http.delete(f"/train/{running}")
    assert flagged.status_code == 200 and flagged.json()["status"] == "running" and flagged.json()["cancel_requested"]
    refused = await http.delete(f"/train/{publishing}")
    assert refused.status_code == 409 and "publishing" in refused.json()["error"]["message"]
    for method in ("GET", "DELETE"):
        unknown = await http.request(method, "/train/nope")
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found"


async def test_jobs_are_listed_newest_first_with_their_owner(train: Train) -> None:
    ids = [await submit_classifier(train) for _ in range(3)]
    jobs = (await train.facade.http.get("/train")).json()["jobs"]
    assert [j["job_id"] for j in jobs] == ids[::-1]
    assert [j["created_unix"] for j in jobs] == sorted((j["created_unix"] for j in jobs), reverse=True)
    assert {j["owner"] for j in jobs} == {KEY_NAME} and {j["status"] for j in jobs} == {"queued"}
    newest_two = (await train.facade.http.get("/train", params={"limit": 2})).json()["jobs"]
    assert [j["job_id"] for j in newest_two] == ids[:0:-1]


async def test_events_of_a_finished_job_end_with_its_status(train: Train) -> None:
    job_id = await submit_classifier(train)
    store = train.facade.state.jobs
    assert store.start(job_id, "test-worker")
    assert store.finish(job_id, "test-worker", "succeeded", result={"test": {"accuracy": 0.9}})
    r = await train.facade.http.get(f"/train/{job_id}/events")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert [name for name, _ in events] == ["status"]
    assert events[0][1]["job_id"] == job_id and events[0][1]["status"] == "succeeded"
    assert (await train.facade.http.get("/train/nope/events")).status_code == 404
