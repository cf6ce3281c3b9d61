"""Keeping the job store truthful: worker heartbeats, the reaper, and retention of job folders.

Every worker runs a `Heartbeat` thread that only beats, every `heartbeat_interval_s`, and a
housekeeping thread beside it that reaps (fails the running jobs of workers whose heartbeat is
older than `worker_timeout_s`, and `new` records that were never enqueued) and, now and then,
sweeps what finished jobs and publishes left behind (training.retention: old job records with
their folders, unused ONNX exports).
The facade reaps too (api.job_liveness), so the job of a worker killed while
it was the only one still ends `failed`.
"""

from __future__ import annotations

import logging
import threading
import time

from training.jobs import Job, JobSettings, JobStore, new_worker_id

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 600.0
HOUSEKEEPING_STOP_WAIT_S = 5.0
"""On exit, how long the worker waits for a housekeeping round to end (a reload after recovering
a dead peer's publish can take minutes: it is left to die with the process)."""


class Heartbeat:
    """A worker's liveness, as a context manager: beats from entry (synchronously, so the worker
    counts as alive before it takes a job) until exit, when the worker is forgotten at once.

    The beat has a thread of its own that does nothing else: housekeeping (`housekeeping=True`:
    reaping, which may roll back a dead peer's publish and reload models for minutes, and the
    retention sweep) runs on a second thread, so however long it takes, this worker keeps
    beating and its running job is not failed as "worker lost"."""

    def __init__(
        self, store: JobStore, settings: JobSettings, worker_id: str | None = None, housekeeping: bool = False
    ) -> None:
        self.store, self.settings = store, settings
        self.worker_id = worker_id or new_worker_id()
        self.housekeeping = housekeeping
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._chores = threading.Thread(target=self._run_housekeeping, name="housekeeping", daemon=True)
        self._last_prune = 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                self.store.heartbeat(self.worker_id)
            except Exception:  # the store being briefly unreachable must not end the heartbeat
                log.exception("heartbeat failed")

    def _run_housekeeping(self) -> None:
        first = True
        while first or not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                reaped = reap(self.store, self.settings)
                if reaped and first:
                    log.warning("failed %d job(s) of lost workers", len(reaped))
                if time.monotonic() - self._last_prune > PRUNE_INTERVAL_S or first:
                    self._prune()
            except Exception:  # as for the beat: the next round tries again
                log.exception("housekeeping failed")
            first = False

    def _prune(self) -> None:
        from training.retention import sweep

        self._last_prune = time.monotonic()
        sweep(self.settings, self.store)

    def __enter__(self) -> Heartbeat:
        self.store.heartbeat(self.worker_id)
        self._thread.start()
        if self.housekeeping:
            self._chores.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._chores.is_alive():
            self._chores.join(HOUSEKEEPING_STOP_WAIT_S)
        try:
            self.store.forget_worker(self.worker_id)
        except Exception:
            log.exception("could not remove the heartbeat of %s", self.worker_id)


def reap(store: JobStore, settings: JobSettings) -> list[Job]:
    """store.reap(), and when a reaped job was publishing, undo its uncommitted publish now (the
    running Triton may have loaded its versions) instead of at Triton's next start."""
    reaped = store.reap()
    if any(job.phase == "publishing" for job in reaped):
        from publish.hot_swap import recover_and_reload

        recover_and_reload(settings.model_repository, settings.triton_http_url)
    return reaped
