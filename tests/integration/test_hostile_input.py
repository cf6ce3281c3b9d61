"""The facade against an attacker over real sockets: the real facade process (no Triton behind it:
every case here is refused before Triton would be asked). Body limits (declared and chunked 600 MB
bodies over a raw socket, the facade's memory watched), an upload abandoned mid-body, and the
client library and CLI sending the key. Times are printed (run with -s), never asserted: the
machine is shared.

The rest of what an attacker meets is checked in-process (tests/unit/facade/): the operator key on
every /train route, eleven hostile datasets, parameter bounds (test_http_train.py,
test_http_validation.py), request ids and what error bodies leak (test_http_triton_down.py).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

from client.facade_client import FacadeClient
from contract.errors import ApiError, AuthenticationError
from tests.conftest import PROJECT_ROOT, TEST_API_KEY, Facade, free_port, start_facade
from training.jobs import JobSettings
from training.stores import job_store

pytestmark = pytest.mark.integration

MiB = 1 << 20
UPLOAD_LIMIT = 16 * MiB
"""This facade's upload limit (FLUXSERVE_JOBS_MAX_UPLOAD_BYTES): small, so chunked uploads past it stay quick."""
BIG = 600 * MiB
WORKER_ID = "test-hostile-heartbeat"
STORE_FILES = {
    "jobs.sqlite",
    "jobs.sqlite-wal",
    "jobs.sqlite-shm",
    "queue.sqlite",
    "queue.sqlite-wal",
    "queue.sqlite-shm",
}


class Heartbeat:
    """Stands in for a worker in the job store the facade reads, until closed."""

    def __init__(self, jobs_dir: Path) -> None:
        self.store = job_store(JobSettings(jobs_dir=jobs_dir))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.store.heartbeat(WORKER_ID)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stopped.wait(1.0):
            self.store.heartbeat(WORKER_ID)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()


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
        # POST /train answers 503 while no worker is alive: this test heartbeats for one, so that a
        # request with the key is accepted and its job stays queued (no training beside the tests).
        self.worker = Heartbeat(self.jobs_dir)
        # Nothing listens on this port: Triton is "down" for the whole module.
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
