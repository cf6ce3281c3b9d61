"""The training worker: `python -m training.worker` (started by `make up`, its own container in
docker-compose). Runs queued jobs one at a time (training saturates the machine), heartbeats
into the job store (training.liveness: a worker killed mid-job has its job failed by the others
or the facade), and stops cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from client.control_key import control_key
from common.paths import PROJECT_ROOT
from common.secret_strength import SecretConfigError
from training.jobs import JobSettings, make_huey
from training.liveness import Heartbeat
from training.stores import job_store
from training.tasks import register_tasks

log = logging.getLogger("fluxserve.worker")


@contextmanager
def running_worker(
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    stop_timeout_s: float = 30.0,
    ready_timeout_s: float = 120.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """This worker as a child process (`make up`, benchmarks, tests), configured by FLUXSERVE_JOBS_
    variables in `env`; its output is appended to `log_path` or shared with ours. Yields once the
    worker heartbeats (POST /train answers 503 until some worker does). On exit it gets SIGINT
    (huey lets the running task reach a step boundary) and is killed after `stop_timeout_s`."""
    out = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "training.worker"],
            cwd=PROJECT_ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor
    try:
        _wait_alive(proc, env or {}, ready_timeout_s)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("worker did not stop in %.0fs; killing it", stop_timeout_s)
                proc.kill()
                proc.wait()


def _wait_alive(proc: subprocess.Popen[bytes], env: Mapping[str, str], timeout_s: float) -> None:
    settings = JobSettings(
        **{k.removeprefix("FLUXSERVE_JOBS_").lower(): v for k, v in env.items() if k.startswith("FLUXSERVE_JOBS_")}
    )
    store = job_store(settings)
    before = set(store.alive_workers())
    deadline = time.monotonic() + timeout_s
    while not set(store.alive_workers()) - before:
        if proc.poll() is not None:
            raise RuntimeError(f"the training worker exited with {proc.returncode} before its first heartbeat")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the training worker did not heartbeat within {timeout_s:.0f}s")
        time.sleep(0.2)


def main() -> int:
    # Training shares the cores with Triton when both run on one machine (`make up`). OpenMP's
    # default busy-wait makes torch's idle worker threads spin and fight the serving processes
    # (docs/benchmarks.md, "Training job and hot swap"). Set before torch loads (it reads it once).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("onnx_ir", "onnxscript"):  # a line per rewritten node during every ONNX export
        logging.getLogger(chatty).setLevel(logging.WARNING)
    settings = JobSettings()
    try:
        huey = make_huey(settings)  # refuses a missing, placeholder or weak queue secret / Redis password
        control_key()  # the publish sends it: a placeholder is refused now, not at the first publish
    except SecretConfigError as e:  # the message names the variable to set: no traceback
        log.error("not starting: %s", e)
        return 2
    with Heartbeat(job_store(settings), settings, housekeeping=True) as beat:
        register_tasks(huey, settings, beat.worker_id)
        log.info(
            "worker %s ready (queue: %s, jobs: %s)",
            beat.worker_id,
            "redis" if settings.redis_url else "sqlite",
            settings.jobs_dir,
        )
        consumer = huey.create_consumer(workers=1, worker_type="thread", periodic=False, check_worker_health=True)
        consumer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
