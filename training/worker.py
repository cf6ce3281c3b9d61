"""The training worker: `python -m training.worker` (started by `make up`, its own container in
docker-compose). Runs queued jobs one at a time (training saturates the machine), marks jobs a
previous worker left half-done as failed, and stops cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from training.jobs import JobSettings, job_store, make_huey
from training.tasks import register_tasks
from common.paths import PROJECT_ROOT

log = logging.getLogger("fluxserve.worker")



@contextmanager
def running_worker(env: Mapping[str, str] | None = None, log_path: Path | None = None,
                   stop_timeout_s: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    """This worker as a child process (`make up`, benchmarks, tests), configured by FLUXSERVE_JOBS_
    variables in `env`; its output is appended to `log_path` or shared with ours. On exit it gets
    SIGINT (huey lets the running task reach a step boundary) and is killed after `stop_timeout_s`."""
    out = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "training.worker"], cwd=PROJECT_ROOT,
                                env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT if out else None)
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor
    try:
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


def main() -> int:
    # Training shares the cores with Triton when both run on one machine (`make up`). OpenMP's
    # default busy-wait makes torch's idle worker threads spin and fight the serving processes:
    # measured with fluxserve-bench swap under /generate load, 0.9 training steps/s with spinning,
    # 6.0 passive, with the same /generate latency. Set before torch loads (it reads it once).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("onnx_ir", "onnxscript"):  # a line per rewritten node during every ONNX export
        logging.getLogger(chatty).setLevel(logging.WARNING)
    settings = JobSettings()
    orphans = job_store(settings).fail_orphans()
    if orphans:
        log.warning("marked %d job(s) left running by a stopped worker as failed", orphans)
    huey = make_huey(settings)
    register_tasks(huey, settings)
    log.info("worker ready (queue: %s, jobs: %s)", "redis" if settings.redis_url else "sqlite", settings.jobs_dir)
    consumer = huey.create_consumer(workers=1, worker_type="thread", periodic=False, check_worker_health=True)
    consumer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
