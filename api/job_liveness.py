"""The facade's side of job liveness: it reaps (so the job of the last worker killed still ends
`failed`) and refuses new jobs it cannot honour, with 503 + Retry-After instead of a 202 whose
job would wait forever."""

from __future__ import annotations

import asyncio
import logging

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.errors import envelope
from training.jobs import JobSettings, JobStore
from training.liveness import reap

log = logging.getLogger(__name__)

NO_WORKER_RETRY_AFTER_S = 10
QUEUE_FULL_RETRY_AFTER_S = 30


async def reap_forever(store: JobStore, settings: JobSettings) -> None:
    """Run the reaper every heartbeat interval until cancelled (the facade's lifespan)."""
    while True:
        try:
            await run_in_threadpool(reap, store, settings)
        except Exception:  # a store hiccup must not end the loop
            log.exception("reaping lost jobs failed")
        await asyncio.sleep(settings.heartbeat_interval_s)


def _unavailable(kind: str, message: str, retry_after_s: int) -> JSONResponse:
    response = envelope(503, kind, message)
    response.headers["Retry-After"] = str(retry_after_s)
    return response


async def refuse_new_job(store: JobStore, settings: JobSettings) -> JSONResponse | None:
    """503 when no worker is alive or the queue is full; None when a job may be accepted."""
    if not await run_in_threadpool(store.alive_workers):
        return _unavailable("no_worker", "no training worker is running; retry later", NO_WORKER_RETRY_AFTER_S)
    if await run_in_threadpool(store.waiting) >= settings.max_queued_jobs:
        return _unavailable(
            "queue_full", f"{settings.max_queued_jobs} jobs are already waiting; retry later", QUEUE_FULL_RETRY_AFTER_S
        )
    return None
