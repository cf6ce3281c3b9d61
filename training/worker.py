"""The training worker: `python -m training.worker` (started by `make up`, its own container in
docker-compose). Runs queued jobs one at a time (training saturates the machine), marks jobs a
previous worker left half-done as failed, and stops cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import sys

from training.jobs import JobSettings, job_store, make_huey
from training.tasks import register_tasks

log = logging.getLogger("fluxserve.worker")


def main() -> int:
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
