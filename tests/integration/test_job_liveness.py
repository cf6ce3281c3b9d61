"""Job liveness end to end on the embedded default (SQLite): the real facade and real worker
processes, classifier jobs (no Triton needed with publish=false). A worker killed with SIGKILL
mid-job has its job failed ("worker lost"), POST /train answers 503 + Retry-After while no
worker is alive or the queue is full, and the next job runs once a worker is back."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from common.paths import BUILD_DIR
from tests.conftest import TEST_API_KEY, start_facade
from tests.small_classifier_data import small_classifier_env
from training.worker import running_worker

pytestmark = pytest.mark.integration

LIVENESS_ENV = {
    "FLUXSERVE_JOBS_HEARTBEAT_INTERVAL_S": "0.5",
    "FLUXSERVE_JOBS_WORKER_TIMEOUT_S": "5",
    "FLUXSERVE_JOBS_MAX_QUEUED_JOBS": "2",
}
UNUSED_TRITON = "127.0.0.1:9"  # classifier jobs without publish never reach Triton


def wait_job(http: httpx.Client, job_id: str, done, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = http.get(f"/train/{job_id}").json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck: {job}"
        time.sleep(0.3)


def submit(http: httpx.Client, epochs: int) -> httpx.Response:
    return http.post("/train", data={"kind": "classifier", "steps": str(epochs), "publish": "false", "seed": "0"})


def _answer_without_sending_the_body(url: str) -> bytes:
    """The head of the facade's answer to a POST /train that declares 64 MiB and `Expect:
    100-continue`, then waits without sending any of it (`curl` does this for large uploads)."""
    parts = urlsplit(url)
    request = (
        f"POST /train HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {TEST_API_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: {64 << 20}\r\n"
        "Expect: 100-continue\r\n\r\n"
    )
    answer = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request.encode())
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    return answer.partition(b"\r\n\r\n")[0]


def test_killed_worker_fails_its_job_and_the_next_job_runs(tmp_path: Path) -> None:
    env = {"FLUXSERVE_JOBS_JOBS_DIR": str(tmp_path / "jobs"), **LIVENESS_ENV, **small_classifier_env(tmp_path)}
    log = BUILD_DIR / "logs" / "test-liveness-worker.log"
    facade = start_facade(UNUSED_TRITON, env)
    try:
        with facade.client() as http:
            refused = submit(http, 1)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["type"] == "no_worker" and int(refused.headers["Retry-After"]) > 0
            assert http.get("/train").json()["jobs"] == []  # nothing was created
            # Refused before the body is read: a client that waits for `100 Continue` sends none of it.
            head = _answer_without_sending_the_body(facade.url)
            assert head.startswith(b"HTTP/1.1 503") and b"retry-after" in head.lower(), head

            with running_worker(env, log) as worker:
                r = submit(http, 50)
                assert r.status_code == 202, r.text
                long_job = r.json()["job_id"]
                running = wait_job(http, long_job, lambda j: j["status"] == "running" and j["progress"].get("step"))
                waiting = [submit(http, 50).json()["job_id"] for _ in range(2)]
                full = submit(http, 1)
                assert full.status_code == 503 and full.json()["error"]["type"] == "queue_full", full.text
                assert "Retry-After" in full.headers
                for job_id in waiting:  # keep them from running after the kill
                    assert http.delete(f"/train/{job_id}").json()["status"] == "cancelled"
                assert running["worker"]
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait(30)
                failed = wait_job(http, long_job, lambda j: j["status"] != "running", timeout_s=120)
            assert failed["status"] == "failed" and "worker lost" in failed["error"], failed
            assert submit(http, 1).status_code == 503  # the dead worker no longer counts

            with running_worker(env, log):
                r = submit(http, 1)
                assert r.status_code == 202, r.text
                done = wait_job(http, r.json()["job_id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
            assert done["status"] == "succeeded", done
            assert done["worker"] != running["worker"]
            assert [http.get(f"/train/{j}").json()["status"] for j in waiting] == ["cancelled", "cancelled"]
    finally:
        facade.stop()
