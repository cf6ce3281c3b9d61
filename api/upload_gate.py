"""POST /train's admission, decided before a byte of the body is read.

An upload costs disk (up to the upload limit, then the extracted dataset) and a thread decoding
images; one that no worker could take would be read, extracted and decoded only to be refused. So
the route asks here first, after the operator key (an anonymous caller learns nothing about the
queue) and before the multipart body: a free upload slot in this facade (503), a live worker and
room in the queue (503, api.job_liveness), enough free disk under the jobs folder (507). Refusals
carry Retry-After; the unread body is discarded by the server, and a client that sent
`Expect: 100-continue` never sends it at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.errors import envelope, retry_after
from api.job_liveness import refuse_new_job
from api.settings import ApiSettings
from training.jobs import JobSettings, JobStore

MiB = 1024 * 1024
UPLOADS_BUSY_RETRY_AFTER_S = 5
LOW_DISK_RETRY_AFTER_S = 60


class UploadSlots:
    """Uploads this facade process is receiving or validating now. Taken and released on the
    event loop only (no await between the check and the take), so a plain counter is exact."""

    def __init__(self) -> None:
        self.in_flight = 0

    def try_take(self, limit: int) -> bool:
        if self.in_flight >= limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


def uploads_busy(limit: int) -> JSONResponse:
    message = f"{limit} uploads are already in progress; retry later"
    return envelope(503, "too_many_uploads", message, retry_after(UPLOADS_BUSY_RETRY_AFTER_S))


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds `path` (or would: its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


async def refuse_upload(store: JobStore, job_settings: JobSettings, settings: ApiSettings) -> JSONResponse | None:
    """503 (no worker, queue full) or 507 (low disk) for an upload that must not be read; None: go on."""
    refusal = await refuse_new_job(store, job_settings)
    if refusal is not None:
        return refusal
    free = await run_in_threadpool(free_bytes, job_settings.jobs_dir)
    if free < settings.min_free_disk_mb * MiB:
        message = f"less than {settings.min_free_disk_mb} MB of disk is free for uploads; retry later"
        return envelope(507, "insufficient_storage", message, retry_after(LOW_DISK_RETRY_AFTER_S))
    return None
