"""Keeping the job store truthful: worker heartbeats, the reaper, and retention of job folders.

Every worker runs a `Heartbeat` thread: it beats every `heartbeat_interval_s`, reaps (fails the
running jobs of workers whose heartbeat is older than `worker_timeout_s`, and `new` records that
were never enqueued) and, now and then, deletes the folders of jobs finished longer than
`retention_s` ago and the ONNX exports no served version links any more (export.retention).
The facade reaps too (api.job_liveness), so the job of a worker killed while
it was the only one still ends `failed`.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time

from training.jobs import TERMINAL, Job, JobSettings, JobStore, new_worker_id

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 600.0


class Heartbeat:
    """A worker's liveness, as a context manager: beats from entry (synchronously, so the worker
    counts as alive before it takes a job) until exit, when the worker is forgotten at once."""

    def __init__(
        self, store: JobStore, settings: JobSettings, worker_id: str | None = None, housekeeping: bool = False
    ) -> None:
        self.store, self.settings = store, settings
        self.worker_id = worker_id or new_worker_id()
        self.housekeeping = housekeeping
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._last_prune = 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                self.store.heartbeat(self.worker_id)
                if self.housekeeping:
                    reap(self.store, self.settings)
                    if time.monotonic() - self._last_prune > PRUNE_INTERVAL_S:
                        self._prune()
            except Exception:  # the store being briefly unreachable must not end the heartbeat
                log.exception("heartbeat failed")

    def _prune(self) -> None:
        from export.flux.settings import FluxSettings
        from export.retention import prune_unused_exports

        self._last_prune = time.monotonic()
        prune_job_folders(self.settings, self.store)
        prune_unused_exports(FluxSettings().build_dir / "export", self.settings.retention_s)

    def __enter__(self) -> Heartbeat:
        self.store.heartbeat(self.worker_id)
        if self.housekeeping:
            reaped = reap(self.store, self.settings)
            if reaped:
                log.warning("failed %d job(s) of lost workers", len(reaped))
            self._prune()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.store.forget_worker(self.worker_id)
        except Exception:
            log.exception("could not remove the heartbeat of %s", self.worker_id)


def reap(store: JobStore, settings: JobSettings) -> list[Job]:
    """store.reap(), and when a reaped job was publishing, undo its uncommitted publish now (the
    running Triton may have loaded its versions) instead of at Triton's next start."""
    reaped = store.reap()
    if any(job.phase == "publishing" for job in reaped):
        from export.hot_swap import recover_and_reload

        recover_and_reload(settings.model_repository, settings.triton_http_url)
    return reaped


def prune_job_folders(settings: JobSettings, store: JobStore, now: float | None = None) -> list[str]:
    """Delete the folders (dataset, checkpoints, ONNX exports) of jobs finished more than
    `retention_s` ago, and folders with no job record (an upload refused or interrupted) as old.
    A version the repository still serves keeps its files: they are hard links or copies."""
    now = time.time() if now is None else now
    cutoff = now - settings.retention_s
    removed = []
    if not settings.jobs_dir.is_dir():
        return removed
    for folder in settings.jobs_dir.iterdir():
        if not folder.is_dir() or folder.stat().st_mtime > cutoff:
            continue
        job = store.record(folder.name)
        if job is None or (job.status in TERMINAL and job.updated_unix < cutoff):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    if removed:
        log.info("pruned %d job folder(s) older than %.0fs", len(removed), settings.retention_s)
    return removed
