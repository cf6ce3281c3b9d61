"""Scale-out on Redis (FLUXSERVE_JOBS_REDIS_URL), against a real redis-server with a password
(tests/redis_server.py): the real facade and two real worker processes sharing one Redis for the
queue, the job records, heartbeats and the publish lock. Classifier jobs without publish (no
Triton needed)."""

from __future__ import annotations

import os
import pickle
import secrets
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from common.paths import BUILD_DIR
from publish.publish_lock import PublishLockTimeout, redis_lock
from tests.conftest import PROJECT_ROOT, start_facade
from tests.integration.test_job_liveness import UNUSED_TRITON, submit, wait_job
from tests.small_classifier_data import small_classifier_env
from training.jobs import JobSettings, make_huey
from training.redis_jobs import PUBLISH_LOCK_KEY, redis_client
from training.worker import running_worker

pytestmark = pytest.mark.integration

FINISHED = ("succeeded", "failed", "cancelled")


class RedisStack:
    def __init__(self, redis_server, root: Path) -> None:
        redis_server.flush()
        self.env = {
            "FLUXSERVE_JOBS_REDIS_URL": redis_server.url,
            "FLUXSERVE_JOBS_QUEUE_SECRET": secrets.token_hex(16),
            "FLUXSERVE_JOBS_JOBS_DIR": str(root / "jobs"),
            "FLUXSERVE_JOBS_HEARTBEAT_INTERVAL_S": "0.5",
            "FLUXSERVE_JOBS_WORKER_TIMEOUT_S": "5",
            **small_classifier_env(root),
        }
        self.settings = JobSettings(
            **{
                k.removeprefix("FLUXSERVE_JOBS_").lower(): v
                for k, v in self.env.items()
                if k.startswith("FLUXSERVE_JOBS_")
            }
        )
        self.services = ExitStack()
        self.facade = start_facade(UNUSED_TRITON, self.env)
        self.services.callback(self.facade.stop)
        self.workers = {}
        for i in range(2):
            log = BUILD_DIR / "logs" / f"test-redis-worker-{i}.log"
            proc = self.services.enter_context(running_worker(self.env, log))
            self.workers[proc.pid] = (proc, log)

    def worker_of(self, worker_id: str):
        pid = int(worker_id.rsplit("-", 2)[1])  # ids are <host>-<pid>-<random>
        return self.workers[pid]


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    s = RedisStack(redis_server, tmp_path_factory.mktemp("redis-stack"))
    yield s
    s.services.close()


def test_jobs_spread_across_two_workers(stack: RedisStack) -> None:
    with stack.facade.client() as http:
        ids = []
        for _ in range(4):
            r = submit(http, 1)
            assert r.status_code == 202, r.text
            ids.append(r.json()["job_id"])
        jobs = [wait_job(http, i, lambda j: j["status"] in FINISHED) for i in ids]
        listed = {j["job_id"] for j in http.get("/train").json()["jobs"]}
    assert [j["status"] for j in jobs] == ["succeeded"] * 4, jobs
    assert len({j["worker"] for j in jobs}) == 2, [j["worker"] for j in jobs]
    assert set(ids) <= listed
    assert all(j["result"]["test"]["accuracy"] > 0.5 for j in jobs)


def test_an_unsigned_queue_message_is_refused_and_not_executed(stack: RedisStack, tmp_path: Path) -> None:
    """An attacker who can write to Redis pushes a plain pickle that would run code when loaded."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    huey = make_huey(stack.settings)
    before = {log: log.stat().st_size for _, log in stack.workers.values()}
    huey.storage.enqueue(pickle.dumps(Exploit()))
    deadline = time.monotonic() + 60
    while huey.storage.queue_size():  # a worker takes it off the queue...
        assert time.monotonic() < deadline, "no worker read the queue"
        time.sleep(0.1)

    def refusals() -> str:
        return "".join(log.read_bytes()[before[log] :].decode(errors="replace") for _, log in stack.workers.values())

    while "Error reading from queue" not in refusals():  # ...and refuses it (the signature check)
        assert time.monotonic() < deadline, refusals()[-2000:]
        time.sleep(0.1)
    assert "mismatch" in refusals() or "Separator" in refusals()
    assert not marker.exists()
    assert all(proc.poll() is None for proc, _ in stack.workers.values())  # both still serve


def test_a_worker_killed_mid_job_is_detected_and_the_other_runs_the_next(stack: RedisStack) -> None:
    with stack.facade.client() as http:
        r = submit(http, 50)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        running = wait_job(http, job_id, lambda j: j["status"] == "running" and j["progress"].get("step"))
        proc, _ = stack.worker_of(running["worker"])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        failed = wait_job(http, job_id, lambda j: j["status"] != "running", timeout_s=120)
        assert failed["status"] == "failed" and "worker lost" in failed["error"], failed
        r = submit(http, 1)
        assert r.status_code == 202, r.text  # the other worker is alive
        done = wait_job(http, r.json()["job_id"], lambda j: j["status"] in FINISHED)
    assert done["status"] == "succeeded", done
    assert done["worker"] != running["worker"]


HOLDER = """
import sys, time
from publish.publish_lock import redis_lock
from training.redis_jobs import redis_client
with redis_lock(redis_client(sys.argv[1]), sys.argv[2], lease_s=1.0):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_publish_lock_holds_across_processes_and_frees_when_its_holder_dies(redis_server) -> None:
    key = PUBLISH_LOCK_KEY + ":test"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_server.url, key], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        # Three leases long: the holder's renewals keep it, so this publisher must give up.
        with pytest.raises(PublishLockTimeout), redis_lock(redis_client(redis_server.url), key, timeout_s=3.0):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        # A dead holder stops renewing: the lease (1 s) expires and the next publisher gets in.
        with redis_lock(redis_client(redis_server.url), key, timeout_s=30.0):
            assert redis_client(redis_server.url).exists(key)
    finally:
        holder.kill()
        holder.wait()
