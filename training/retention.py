"""Retention: what finished jobs and publishes leave behind is deleted, so that neither the job
store nor the disk grows forever. Workers run `sweep` now and then (training.liveness).

* A finished job (succeeded, failed, cancelled) goes `retention_s` after it finished, or sooner
  when more than `max_finished_jobs` newer ones exist: its folder (dataset, checkpoints, ONNX
  exports) first, then its record, so a sweep cut short leaves a record whose folder is gone
  (deleted again next time), never a folder nothing points at. Unfinished jobs are never touched.
* A folder with no record (an upload refused or cut off) goes once it is `retention_s` old.
* ONNX exports no served version links any more (publish.retention) go once untouched for
  `retention_s`, under the publish lock: a publish decides to reuse an export and links it into
  the repository under that lock, so the sweep must not delete one in between. The sweep only
  tries the lock; while a publish holds it, the exports wait for the next sweep.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from export.flux.settings import FluxSettings
from publish.publish_lock import PublishLockTimeout, redis_lock, repository_lock
from publish.retention import prune_unused_exports
from training.jobs import JobSettings, JobStore, job_dir

log = logging.getLogger(__name__)

SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""Job ids are uuid hex; whoever can write to Redis could plant any string in its index."""


def prune_finished_jobs(settings: JobSettings, store: JobStore, now: float | None = None) -> list[str]:
    """Delete the finished jobs past `retention_s` or beyond the newest `max_finished_jobs`,
    each with its folder; returns their ids."""
    cutoff = (time.time() if now is None else now) - settings.retention_s
    expired = [
        job_id
        for rank, (job_id, finished_unix) in enumerate(store.finished())
        if rank >= settings.max_finished_jobs or finished_unix < cutoff
    ]
    for job_id in expired:
        if SAFE_ID.fullmatch(job_id):  # an id is a folder name: never let a forged one name a path
            shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)
        store.delete(job_id)
    if expired:
        log.info("deleted %d finished job(s) with their folders", len(expired))
    return expired


def prune_orphan_folders(settings: JobSettings, store: JobStore, now: float | None = None) -> list[str]:
    """Delete folders under jobs_dir with no job record, once `retention_s` old; returns their names."""
    cutoff = (time.time() if now is None else now) - settings.retention_s
    removed: list[str] = []
    if not settings.jobs_dir.is_dir():
        return removed
    for folder in settings.jobs_dir.iterdir():
        if folder.is_dir() and folder.stat().st_mtime <= cutoff and store.record(folder.name) is None:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    if removed:
        log.info("deleted %d job folder(s) with no job", len(removed))
    return removed


@contextmanager
def publish_lock_if_free(settings: JobSettings) -> Iterator[None]:
    """The locks a publish holds (publish.publish_lock), in its order, tried once each:
    PublishLockTimeout at once while a publish holds either."""
    with ExitStack() as held:
        if settings.redis_url:
            from training.redis_jobs import PUBLISH_LOCK_KEY, redis_client

            held.enter_context(redis_lock(redis_client(settings.redis_url), PUBLISH_LOCK_KEY, timeout_s=0))
        held.enter_context(repository_lock(settings.model_repository, timeout_s=0))
        yield


def prune_exports(settings: JobSettings, export_root: Path, now: float | None = None) -> list[Path] | None:
    """Unused ONNX exports deleted under the publish lock; None when a publish held it."""
    try:
        with publish_lock_if_free(settings):
            return prune_unused_exports(export_root, settings.retention_s, now)
    except PublishLockTimeout:
        log.info("a publish is running: unused ONNX exports are left for the next sweep")
        return None


def sweep(settings: JobSettings, store: JobStore, export_root: Path | None = None) -> None:
    """One retention pass: finished jobs, orphan folders, unused exports."""
    prune_finished_jobs(settings, store)
    prune_orphan_folders(settings, store)
    prune_exports(settings, export_root or FluxSettings().export_root)
