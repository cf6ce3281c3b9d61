"""The facade against an attacker: the real facade process (no Triton behind it: every case here is
refused before Triton would be asked, and an unreachable Triton is one of the cases).

Covers the operator key on every /train route, body limits (declared and chunked 600 MB bodies over
a raw socket), eleven hostile datasets, parameter bounds, request ids and what error bodies leak.
Times are printed (run with -s), never asserted: the machine is shared.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
from PIL import Image

from client.facade_client import FacadeClient
from contract.errors import ApiError, AuthenticationError
from tests.conftest import PROJECT_ROOT, TEST_API_KEY, Facade, free_port, start_facade
from training.worker import running_worker

pytestmark = pytest.mark.integration

MiB = 1 << 20
UPLOAD_LIMIT = 16 * MiB
"""This facade's upload limit (FLUXSERVE_JOBS_MAX_UPLOAD_BYTES): small, so chunked uploads past it stay quick."""
BIG = 600 * MiB
STORE_FILES = {
    "jobs.sqlite",
    "jobs.sqlite-wal",
    "jobs.sqlite-shm",
    "queue.sqlite",
    "queue.sqlite-wal",
    "queue.sqlite-shm",
}


class Locked:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs_dir = root / "jobs"
        self.tmp_dir = root / "facade-tmp"
        self.tmp_dir.mkdir()
        env = {
            "FLUXSERVE_JOBS_JOBS_DIR": str(self.jobs_dir),
            "FLUXSERVE_JOBS_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
            # Where Python and Starlette would spool uploads: it must stay empty.
            "TMPDIR": str(self.tmp_dir),
        }
        # Nothing listens on this port: Triton is "down" for the whole module. A real worker runs, so
        # that a request with the key is accepted (POST /train answers 503 while no worker is alive).
        self.worker = ExitStack()
        worker_env = {k: v for k, v in env.items() if k != "TMPDIR"}  # the facade's temp dir must stay empty
        self.worker.enter_context(
            running_worker(worker_env, PROJECT_ROOT / "build" / "logs" / "test-worker-hostile.log")
        )
        self.facade: Facade = start_facade(f"127.0.0.1:{free_port()}", env, ready_path="/healthz")

    def job_ids(self) -> list[str]:
        with self.facade.client() as http:
            return [j["job_id"] for j in http.get("/train", params={"limit": 1000}).json()["jobs"]]

    def on_disk(self) -> set[str]:
        return {p.name for p in self.jobs_dir.iterdir()} - STORE_FILES


@pytest.fixture(scope="module")
def locked(tmp_path_factory) -> Iterator[Locked]:
    s = Locked(tmp_path_factory.mktemp("locked"))
    yield s
    s.facade.stop()
    s.worker.close()


# ----------------------------------------------------------------------------- operator key


def _png(size: int = 32) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(b, format="PNG")
    return b.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


WRONG = [
    ("no key", {}),
    ("wrong key", {"Authorization": "Bearer " + "x" * 40}),
    ("basic auth", {"Authorization": "Basic " + base64.b64encode(f"operator:{TEST_API_KEY}".encode()).decode()}),
]


def test_every_train_route_needs_the_key(locked: Locked) -> None:
    with locked.facade.client() as http:
        r = http.post("/train", data={"kind": "classifier", "steps": "1", "publish": "false"})
        assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    before_ids, before_disk = locked.job_ids(), locked.on_disk()
    calls = [
        (
            "POST",
            "/train",
            {
                "data": {"trigger_word": "zxq"},
                "files": {"dataset": ("d.zip", _zip({"a.png": _png()}), "application/zip")},
            },
        ),
        ("GET", "/train", {}),
        ("GET", f"/train/{job_id}", {}),
        ("DELETE", f"/train/{job_id}", {}),
    ]
    refused = 0
    with locked.facade.client(api_key=None) as http:
        for method, path, kwargs in calls:
            for label, headers in WRONG:
                r = http.request(method, path, headers=headers, **kwargs)
                assert r.status_code == 401, (method, path, label, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]["type"] == "unauthorized"
                assert TEST_API_KEY not in r.text
                refused += 1
        # The fifth route, the progress stream, is locked the same way.
        for _, headers in WRONG:
            assert http.get(f"/train/{job_id}/events", headers=headers).status_code == 401
    print(f"\nunauthenticated /train calls refused with 401: {refused} of {len(calls) * len(WRONG)}")
    assert refused == 12
    assert locked.job_ids() == before_ids and locked.on_disk() == before_disk
    with locked.facade.client() as http:
        job = http.get(f"/train/{job_id}").json()
    # Untouched by the refused calls (a real worker may have started it meanwhile, or finished it).
    assert (
        job["status"] in ("queued", "running", "succeeded") and not job["cancel_requested"] and job["owner"] == "tests"
    )
    assert TEST_API_KEY not in locked.facade.log_path.read_text()


def test_inference_routes_stay_open_by_default(locked: Locked) -> None:
    with locked.facade.client(api_key=None) as http:
        # Triton is down here: 503, but not 401.
        assert http.post("/classify", json={"text": "hi"}).status_code == 503


# ----------------------------------------------------------------------------- body limits


def _raw_request(url: str, head: str, body: Iterator[bytes]) -> tuple[int, float, int]:
    """Send `head` and then `body` chunks until the server answers; (status, seconds, bytes sent)."""
    parts = urlsplit(url)
    started = time.perf_counter()
    sent = 0
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head.encode())
        for chunk in body:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer is there: stop sending
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        data = b""
        while b"\r\n" not in data:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, time.perf_counter() - started, sent


def _declared(path: str, extra: str = "") -> str:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {BIG}\r\n{extra}\r\n"


def _chunked(path: str, content_type: str = "application/json", extra: str = "") -> str:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n{extra}\r\n"


def _chunks(total: int, size: int = MiB, first: bytes = b"") -> Iterator[bytes]:
    block = b"\0" * size
    yield f"{len(first):x}\r\n".encode() + first + b"\r\n" if first else b""
    for _ in range(total // size):
        yield f"{size:x}\r\n".encode() + block + b"\r\n"
    yield b"0\r\n\r\n"


def _declared_body() -> Iterator[bytes]:
    block = b"\0" * MiB
    for _ in range(BIG // MiB):
        yield block


@pytest.mark.parametrize("path", ["/classify", "/generate", "/train"])
def test_600mb_declared_body_refused_at_once(locked: Locked, path: str) -> None:
    proc = psutil.Process(locked.facade.proc.pid)
    rss_before = proc.memory_info().rss
    auth = f"Authorization: Bearer {TEST_API_KEY}\r\n"
    status, seconds, sent = _raw_request(locked.facade.url, _declared(path, auth), _declared_body())
    rss_growth = proc.memory_info().rss - rss_before
    print(
        f"\n600 MB declared body to {path}: {status} in {seconds:.3f}s after sending {sent / MiB:.0f} MiB; facade RSS +{rss_growth / MiB:.1f} MiB"
    )
    assert status == 413
    assert sent < BIG
    assert rss_growth < 64 * MiB


@pytest.mark.parametrize(
    ("path", "content_type"), [("/classify", "application/json"), ("/train", "multipart/form-data; boundary=XyZ")]
)
def test_600mb_chunked_body_cut_off(locked: Locked, path: str, content_type: str) -> None:
    proc = psutil.Process(locked.facade.proc.pid)
    rss_before = proc.memory_info().rss
    before_disk = locked.on_disk()
    # A multipart body whose file part never ends: the upload limit cuts it off while streaming.
    first = (
        b'--XyZ\r\nContent-Disposition: form-data; name="dataset"; filename="d.zip"\r\n\r\n'
        if path == "/train"
        else b""
    )
    auth = f"Authorization: Bearer {TEST_API_KEY}\r\n"
    status, seconds, sent = _raw_request(
        locked.facade.url, _chunked(path, content_type, auth), _chunks(BIG, first=first)
    )
    rss_growth = proc.memory_info().rss - rss_before
    print(
        f"\n600 MB chunked body to {path}: {status} in {seconds:.3f}s after sending {sent / MiB:.0f} MiB; facade RSS +{rss_growth / MiB:.1f} MiB"
    )
    assert status == 413
    assert sent < BIG
    assert rss_growth < 64 * MiB
    assert locked.on_disk() == before_disk  # the partial upload was removed
    assert not any(locked.tmp_dir.iterdir())


def test_aborted_upload_leaves_nothing(locked: Locked) -> None:
    before_ids, before_disk = locked.job_ids(), locked.on_disk()
    parts = urlsplit(locked.facade.url)
    head = _chunked("/train", "multipart/form-data; boundary=XyZ", f"Authorization: Bearer {TEST_API_KEY}\r\n")
    first = b'--XyZ\r\nContent-Disposition: form-data; name="dataset"; filename="d.zip"\r\n\r\n' + b"\0" * MiB
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head.encode() + f"{len(first):x}\r\n".encode() + first + b"\r\n")
        deadline = time.monotonic() + 10  # vanish mid-body once the facade is writing the upload
        while not (locked.on_disk() - before_disk) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert locked.on_disk() - before_disk, "the upload never started"
    deadline = time.monotonic() + 10
    while locked.on_disk() != before_disk and time.monotonic() < deadline:
        time.sleep(0.1)
    assert locked.on_disk() == before_disk and locked.job_ids() == before_ids
    with locked.facade.client() as http:
        assert http.get("/healthz").status_code == 200


# ----------------------------------------------------------------------------- hostile datasets


def _symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.png", _png())
        info = zipfile.ZipInfo("link.png")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _gigabyte_of_zeros() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("ok.png", _png())
        with zf.open("zeros.png", "w", force_zip64=True) as fh:
            block = b"\0" * (16 * MiB)
            for _ in range(64):
                fh.write(block)
    return buf.getvalue()


def _huge_png(side: int = 20000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side pixels (about 50 KB: its rows are all zero)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(rows.compress(row) for _ in range(side)) + rows.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


HOSTILE = {
    "zip-slip": lambda: _zip({"../../escape.png": _png()}),
    "absolute": lambda: _zip({"/tmp/fluxserve-escape.png": _png()}),
    "windows-path": lambda: _zip({"C:\\..\\..\\escape.png": _png()}),
    "symlink": _symlink_zip,
    "1gb-of-zeros": _gigabyte_of_zeros,
    "20000x20000-png": lambda: _zip({"huge.png": _huge_png()}),
    "html-as-jpg": lambda: _zip({"photo.jpg": b"<html><script>alert(1)</script></html>"}),
    "not-a-zip": lambda: b"%PDF-1.4 this is not a zip",
    "empty-zip": lambda: _zip({}),
    "5000-tiny-files": lambda: _zip({f"f{i}.png": b"x" for i in range(5000)}),
    "nested-zip": lambda: _zip({"inner.zip": _zip({"a.png": _png()}), "b.png.zip": _zip({"c.png": _png()})}),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_dataset_refused(locked: Locked, case: str) -> None:
    payload = HOSTILE[case]()
    before_ids, before_disk = locked.job_ids(), locked.on_disk()
    started = time.perf_counter()
    with locked.facade.client() as http:
        r = http.post("/train", data={"trigger_word": "zxq"}, files={"dataset": ("d.zip", payload, "application/zip")})
    seconds = time.perf_counter() - started
    print(
        f"\nhostile dataset {case} ({len(payload)} bytes): {r.status_code} in {seconds:.3f}s: {r.json()['error']['message']}"
    )
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["type"] in ("invalid_dataset", "invalid_request")
    assert locked.job_ids() == before_ids
    assert locked.on_disk() == before_disk
    assert not any(locked.tmp_dir.iterdir())
    assert not (locked.root.parent / "escape.png").exists() and not Path("/tmp/fluxserve-escape.png").exists()
    assert not any(p.name.endswith("escape.png") for p in locked.root.rglob("*"))


# ----------------------------------------------------------------------------- parameter bounds


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "fragment"),
    [
        ("GET", "/train", {"params": {"limit": "252893660392803830821802478690893824"}}, "limit"),
        ("GET", "/train", {"params": {"limit": "-10000000000000000000"}}, "limit"),
        ("GET", "/train", {"params": {"limit": "0"}}, "limit"),
        ("GET", "/train/x/events", {"params": {"poll_s": "0"}}, "poll_s"),
        ("GET", "/train/x/events", {"params": {"poll_s": "nan"}}, "poll_s"),
        ("GET", "/train/x/events", {"params": {"poll_s": "inf"}}, "poll_s"),
        ("POST", "/generate", {"json": {"prompt": "x", "seed": 2**63 - 1, "num_images": 2}}, "seed"),
        ("POST", "/generate", {"json": {"prompt": "x", "seed": 2**63}}, "seed"),
        ("POST", "/train", {"data": {"kind": "classifier", "steps": "0"}}, "allowed range [1, 50]"),
        ("POST", "/train", {"data": {"kind": "classifier", "steps": str(10**8)}}, "allowed range [1, 50]"),
        ("POST", "/train", {"data": {"kind": "classifier", "batch_size": "0"}}, "batch_size"),
        ("POST", "/train", {"data": {"kind": "classifier", "learning_rate": "1000"}}, "learning_rate"),
        ("POST", "/train", {"data": {"kind": "classifier", "learning_rate": "nan"}}, "learning_rate"),
        ("POST", "/train", {"data": {"kind": "classifier", "seed": str(2**64)}}, "seed"),
    ],
)
def test_parameters_are_bounded(locked: Locked, method: str, path: str, kwargs: dict, fragment: str) -> None:
    before = locked.job_ids()
    with locked.facade.client() as http:
        r = http.request(method, path, **kwargs)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"]["message"]
    assert locked.job_ids() == before


# ----------------------------------------------------------------------------- what leaks


def test_request_id_on_responses_and_log_lines(locked: Locked) -> None:
    with locked.facade.client(api_key=None) as http:
        guess = http.get("/train", headers={"X-Request-ID": "guess-1", "Authorization": "Bearer " + "y" * 30})
        # Triton is down here: the 503 is logged, under the caller's id.
        mine = http.post("/classify", json={"text": "hi"}, headers={"X-Request-ID": "caller-id-123"})
        odd = http.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces" + "z" * 200})
        fresh = http.get("/healthz")
        unknown = http.get("/no/such/route")
    assert guess.status_code == 401 and guess.headers["x-request-id"] == "guess-1"
    assert mine.status_code == 503 and mine.headers["x-request-id"] == "caller-id-123"
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
    assert (
        re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
        and fresh.headers["x-request-id"] != odd.headers["x-request-id"]
    )
    assert (
        unknown.status_code == 404
        and unknown.headers["x-request-id"]
        and unknown.json()["error"]["type"] == "not_found"
    )
    deadline = time.monotonic() + 10
    while "[caller-id-123]" not in locked.facade.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log_text = locked.facade.log_path.read_text()
    assert [ln for ln in log_text.splitlines() if "[caller-id-123]" in ln]
    # A wrong key writes no line of its own: a guessing client would fill the log (api/auth_limit.py
    # warns once, when the client is limited).
    assert "[guess-1]" not in log_text


def test_errors_do_not_leak_addresses_or_triton_text(locked: Locked) -> None:
    with locked.facade.client(api_key=None) as http:
        ready = http.get("/readyz")
        classify = http.post("/classify", json={"text": "hello"}, headers={"X-Request-ID": "leak-check"})
    assert ready.status_code == 503 and ready.json()["ready"] is False  # deliberate: Triton is down
    assert "127.0.0.1" not in ready.text and "triton" not in ready.json()
    assert classify.status_code == 503
    body = classify.json()["error"]
    assert body["type"] == "unavailable" and "leak-check" in body["message"]
    assert "127.0.0.1" not in classify.text and "failed to connect" not in classify.text.lower()
    log_text = locked.facade.log_path.read_text()
    raw = [ln for ln in log_text.splitlines() if "[leak-check]" in ln]
    assert raw and any("ServerUnavailableError" in ln for ln in raw), raw


# ----------------------------------------------------------------------------- client library and CLI


def test_client_library_sends_the_key(locked: Locked, monkeypatch) -> None:
    with FacadeClient(locked.facade.url, api_key=TEST_API_KEY) as api:
        job = api.submit_classifier(epochs=1, publish=False)
        assert api.job(job["job_id"])["owner"] == "tests"
        assert job["job_id"] in [j["job_id"] for j in api.jobs(limit=1000)]
        assert api.cancel(job["job_id"])["status"] == "cancelled"
        with pytest.raises(ApiError) as err:
            api.cancel(job["job_id"])
        assert err.value.status == 409 and err.value.kind == "conflict"
    monkeypatch.setenv("FLUXSERVE_API_KEY", TEST_API_KEY)
    with FacadeClient(locked.facade.url) as api:  # the key from the environment
        assert api.job(job["job_id"])["status"] == "cancelled"
    monkeypatch.delenv("FLUXSERVE_API_KEY")
    with FacadeClient(locked.facade.url) as api, pytest.raises(AuthenticationError):
        api.jobs()


def test_cli_takes_the_key_from_flag_or_environment(locked: Locked) -> None:
    cli = [sys.executable, "-m", "client.cli", "train", "--api-url", locked.facade.url]
    env = {k: v for k, v in os.environ.items() if k != "FLUXSERVE_API_KEY"}

    def run(args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            cli + args, cwd=PROJECT_ROOT, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=120
        )

    done = run(["list", "--limit", "5"], {"FLUXSERVE_API_KEY": TEST_API_KEY})
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), list)
    done = run(["--api-key", TEST_API_KEY, "submit", "--kind", "classifier", "--steps", "1", "--no-publish"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "queued"  # as submitted; the worker takes it from there
    done = run(["--api-key", "z" * 32, "list"])
    assert done.returncode == 2 and "401" in done.stderr and "z" * 32 not in done.stderr
