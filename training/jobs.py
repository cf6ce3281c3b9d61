"""Training jobs: a persistent record store and the queue that carries them to the worker.

* Records (status, progress, result, errors, worker heartbeats) live behind one `JobStore`
  interface: SQLite (`<jobs_dir>/jobs.sqlite`, the embedded default) or Redis when
  FLUXSERVE_JOBS_REDIS_URL is set (training.redis_jobs; training.stores picks one), so workers on several machines share
  only Redis and the model repository.
* The queue is huey: `SqliteHuey` by default (embedded, no server), `RedisHuey` when
  FLUXSERVE_JOBS_REDIS_URL is set; Redis messages are signed (FLUXSERVE_JOBS_QUEUE_SECRET).

A job's life: new -> queued -> running -> succeeded | failed | cancelled. A finished job's record
is final: no write changes it any more (`NEXT` lists the only moves; every write goes through one
guarded transaction), so a worker that finishes a job the reaper already failed cannot turn it
into `succeeded`, nor anyone move it back to running.

* `new`: the record exists but its queue message may not yet. It is invisible to the API, and it
  only becomes `queued` after the message is enqueued; a `new` record older than
  `submit_timeout_s` (the facade died between the two) is marked failed by the reaper, so
  nothing waits forever for a message that was never sent. A worker may start a `new` job (its
  message exists, or the worker would not have it).
* `running` jobs carry the id of their worker; every worker heartbeats into the store, and a
  running job whose worker's heartbeat is older than `worker_timeout_s` is failed ("worker
  lost") by the reaper, which the workers and the facade both run. Only that worker's jobs.
* Cancelling a queued job marks it cancelled (the worker skips it); cancelling a running one sets
  a flag the trainer checks at every step; a job that is publishing refuses to be cancelled
  (409): publishing is short, and a half-aborted publish is what the journal exists to avoid.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from huey import RedisHuey, SqliteHuey
from huey.api import Huey
from huey.serializer import SignedSerializer
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.paths import BUILD_DIR, MODEL_REPOSITORY
from common.secret_strength import SecretConfigError, require_strong_secret
from contract.specs import ENDPOINTS, TRAIN_LIMITS, JobKind

log = logging.getLogger(__name__)

JobStatus = Literal["new", "queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
WAITING: frozenset[str] = frozenset({"new", "queued"})
NEXT: dict[str, frozenset[str]] = {
    "new": frozenset({"queued", "running", "failed", "cancelled"}),
    "queued": frozenset({"running", "failed", "cancelled"}),
    "running": TERMINAL,
    **{status: frozenset() for status in TERMINAL},
}
"""The statuses each status may change to (a worker may start a `new` job: its message exists)."""
PUBLISH_ADAPTER = "adapter"
"""A flux_lora job's `publish` param (and POST /train's field) that publishes the LoRA as an adapter
(common.adapter_store) instead of a new model version."""
PublishMode = bool | Literal["adapter"]
"""A job's `publish` param: True (a new model version), False (train only) or PUBLISH_ADAPTER."""
ADAPTER_NAME_PARAM = "adapter_name"
"""The job param naming the adapter a publish=adapter job publishes (checked and claimed at submit)."""
WORKER_LOST = "worker lost: its worker stopped heartbeating while the job was running; resubmit it"
NEVER_QUEUED = "never queued: the submission was interrupted before the job reached the queue; resubmit it"


class JobSettings(BaseSettings):
    """Environment prefix: FLUXSERVE_JOBS_."""

    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_JOBS_")

    jobs_dir: Path = BUILD_DIR / "jobs"
    redis_url: str | None = None
    """Use Redis for the queue and the job records (several worker machines); default: SQLite."""
    queue_secret: SecretStr | None = None
    """Key that signs the Redis queue's messages (required with redis_url): whoever can write to
    Redis must not be able to make a worker unpickle arbitrary objects."""
    triton_http_url: str = f"{ENDPOINTS.host}:{ENDPOINTS.triton_http_port}"
    """Triton to load re-exported models into (HTTP model-control API)."""
    model_repository: Path = MODEL_REPOSITORY
    base_checkpoint: str | None = None
    """FLUX base to train on and re-export; default: the local checkpoint `make models` builds."""
    max_upload_bytes: int = TRAIN_LIMITS.max_upload_bytes
    """The one upload limit: POST /train bodies and dataset zips larger than this are refused (413)."""
    keep_versions: int = 2
    heartbeat_interval_s: float = 2.0
    worker_timeout_s: float = 30.0
    """A worker whose last heartbeat is older than this is lost; its running jobs are failed."""
    submit_timeout_s: float = 600.0
    """A record still `new` (never enqueued) after this long is failed."""
    max_queued_jobs: int = 20
    """POST /train answers 503 while this many jobs wait."""
    retention_s: float = 7 * 24 * 3600.0
    """Finished jobs are deleted this long after they finished: the record and its folder (dataset,
    checkpoints, ONNX exports), and unused ONNX exports untouched as long (training.retention)."""
    max_finished_jobs: int = Field(1000, ge=0)
    """At most this many finished jobs are kept (the newest); older ones go as if expired."""
    publish_lock_timeout_s: float = 3600.0
    """How long a publish waits for another one to finish before failing."""


@dataclass
class Job:
    id: str
    kind: JobKind
    status: str
    created_unix: float
    updated_unix: float
    params: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    cancel_requested: bool = False
    worker: str | None = None
    phase: str | None = None
    """`training` or `publishing` while running."""
    owner: str | None = None
    """The name of the operator key that created the job."""

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["job_id"] = data.pop("id")
        return data


JSON_FIELDS = ("params", "progress", "result")
JOB_FIELDS = tuple(f.name for f in fields(Job))
CancelOutcome = Literal["cancelled", "requested", "publishing", "finished", "missing"]


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class JobStore(ABC):
    """Job records and worker heartbeats. Backends implement storage and one primitive,
    `_transact` (read a job, decide, write, atomically); the state machine lives here, once."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings

    # -- backend primitives -------------------------------------------------------------
    @abstractmethod
    def _insert(self, job: Job) -> None: ...

    @abstractmethod
    def _get(self, job_id: str) -> Job | None:
        """The record whatever its status (also `new`)."""

    @abstractmethod
    def _transact(self, job_id: str, decide: Callable[[Job], dict[str, Any] | None]) -> Job | None:
        """Atomically: read the job, call `decide`, write the fields it returns (if any) with a
        fresh updated_unix. Returns the job after the write, None when there is no such job."""

    @abstractmethod
    def _unfinished(self) -> list[Job]:
        """Jobs in new, queued or running."""

    @abstractmethod
    def list(self, limit: int = 100) -> list[Job]:
        """Newest first, `new` records excluded."""

    @abstractmethod
    def delete(self, job_id: str) -> None: ...

    @abstractmethod
    def finished(self) -> list[tuple[str, float]]:
        """(id, updated_unix) of every job in a terminal status, newest created first (retention)."""

    @abstractmethod
    def heartbeat(self, worker_id: str) -> None: ...

    @abstractmethod
    def forget_worker(self, worker_id: str) -> None: ...

    @abstractmethod
    def alive_workers(self) -> list[str]: ...

    # -- the state machine --------------------------------------------------------------
    def _change(self, job_id: str, decide: Callable[[Job], dict[str, Any] | None]) -> tuple[Job | None, bool]:
        """`_transact` with the one rule every write obeys: a finished record is never written
        again, and a status only moves along `NEXT`. Returns (the job after, whether written)."""
        written = [False]

        def guarded(job: Job) -> dict[str, Any] | None:
            written[0] = False  # Redis runs this again when a concurrent write won: the last call counts
            values = decide(job)
            if not values:
                return None
            status = values.get("status", job.status)
            if job.status in TERMINAL or (status != job.status and status not in NEXT[job.status]):
                log.warning("job %s is %s: refused to write %s", job.id, job.status, sorted(values))
                return None
            written[0] = True
            return values

        return self._transact(job_id, guarded), written[0]

    def update(self, job_id: str, **values: Any) -> bool:
        """Write `values` (progress, result, or a status along `NEXT`); False when refused because
        the job is finished (or there is no such job)."""
        return self._change(job_id, lambda _: values)[1]

    def finish(self, job_id: str, worker_id: str, status: str, **values: Any) -> bool:
        """running on `worker_id` -> `status` (succeeded, failed or cancelled) with `values`. False
        when the job is not that worker's running job any more: the reaper failed it (the worker
        was taken for lost), and that outcome stands."""
        assert status in TERMINAL, status

        def decide(j: Job) -> dict[str, Any] | None:
            return {"status": status, **values} if j.status == "running" and j.worker == worker_id else None

        return self._change(job_id, decide)[1]

    def create(self, kind: JobKind, params: dict[str, Any], job_id: str | None = None, owner: str | None = None) -> Job:
        now = time.time()
        job = Job(
            id=job_id or uuid.uuid4().hex,
            kind=kind,
            status="new",
            created_unix=now,
            updated_unix=now,
            params=params,
            owner=owner,
        )
        self._insert(job)
        return job

    def get(self, job_id: str) -> Job | None:
        job = self._get(job_id)
        return job if job is not None and job.status != "new" else None

    def record(self, job_id: str) -> Job | None:
        """The record whatever its status, `new` included (housekeeping, not the API)."""
        return self._get(job_id)

    def mark_queued(self, job_id: str) -> None:
        """new -> queued, after the queue message was sent (a worker may already run it)."""
        self._change(job_id, lambda j: {"status": "queued"} if j.status == "new" else None)

    def waiting(self) -> int:
        return sum(j.status in WAITING for j in self._unfinished())

    def unfinished(self) -> list[Job]:
        """Jobs in new, queued or running (e.g. the adapter names they will publish)."""
        return self._unfinished()

    def start(self, job_id: str, worker_id: str) -> bool:
        """new/queued -> running on `worker_id`, atomically; False when cancelled or already taken."""
        started, _ = self._change(
            job_id,
            lambda j: {"status": "running", "worker": worker_id, "phase": "training"} if j.status in WAITING else None,
        )
        return started is not None and started.status == "running" and started.worker == worker_id

    def begin_publish(self, job_id: str) -> bool:
        """running -> publishing unless a cancel was requested first (then False)."""
        job, _ = self._change(
            job_id, lambda j: {"phase": "publishing"} if j.status == "running" and not j.cancel_requested else None
        )
        return job is not None and job.phase == "publishing"

    def end_publish(self, job_id: str) -> None:
        self._change(job_id, lambda j: {"phase": "published"} if j.phase == "publishing" else None)

    def cancel(self, job_id: str) -> tuple[Job | None, CancelOutcome]:
        """A waiting job is cancelled now; a training one is flagged to stop at its next step; a
        publishing one is left alone ("publishing": the caller answers 409)."""
        outcome: list[CancelOutcome] = ["missing"]

        def decide(j: Job) -> dict[str, Any] | None:
            if j.status in WAITING:
                outcome[0] = "cancelled"
                return {"status": "cancelled", "error": "cancelled by request"}
            if j.status == "running" and j.phase == "publishing":
                outcome[0] = "publishing"
                return None
            if j.status == "running":
                outcome[0] = "requested"
                return {"cancel_requested": True}
            outcome[0] = "finished"
            return None

        job, _ = self._change(job_id, decide)
        return job, outcome[0]

    def cancel_requested(self, job_id: str) -> bool:
        """The trainer's "stop now": a cancel was asked for, or the record is already final (the
        reaper failed the job, or it is gone), so nothing more of this run could be recorded."""
        job = self._get(job_id)
        return job is None or job.cancel_requested or job.status in TERMINAL

    def reap(self) -> list[Job]:
        """Fail running jobs whose worker is lost and `new` records never enqueued; returns them
        (failed). Safe to run from every worker and facade at once (each transition is conditional)."""
        alive = set(self.alive_workers())
        now = time.time()
        failed = []
        for job in self._unfinished():
            if job.status == "running" and job.worker not in alive:

                def decide(j: Job, w: str | None = job.worker) -> dict[str, Any] | None:
                    return (
                        {"status": "failed", "error": WORKER_LOST} if j.status == "running" and j.worker == w else None
                    )
            elif job.status == "new" and now - job.created_unix > self.settings.submit_timeout_s:

                def decide(j: Job) -> dict[str, Any] | None:
                    return {"status": "failed", "error": NEVER_QUEUED} if j.status == "new" else None
            else:
                continue
            after, _ = self._change(job.id, decide)
            if after is not None and after.status == "failed":
                log.warning("job %s: %s", job.id, after.error)
                failed.append(after)
        return failed


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created_unix REAL NOT NULL,
    updated_unix REAL NOT NULL,
    params TEXT NOT NULL,
    progress TEXT NOT NULL,
    result TEXT NOT NULL,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_unix DESC);
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, beat_unix REAL NOT NULL);
"""
_ADDED_COLUMNS = {
    "worker": "TEXT",
    "phase": "TEXT",
    "owner": "TEXT",
}  # added after the first release: migrated in place


class SqliteJobStore(JobStore):
    """SQLite-backed job records, safe to share between the facade and worker processes of one
    machine (SQLite must not live on network storage: use Redis for several machines)."""

    def __init__(self, settings: JobSettings, path: Path | None = None) -> None:
        super().__init__(settings)
        self.path = path or settings.jobs_dir / "jobs.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._conn() as conn:
            conn.executescript(_SCHEMA)
            have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
            for name, kind in _ADDED_COLUMNS.items():
                if name not in have:
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")  # readers (SSE polling) never block the writer
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    @staticmethod
    def _row(row: sqlite3.Row) -> Job:
        data = {k: row[k] for k in row.keys() if k in JOB_FIELDS}
        for k in JSON_FIELDS:
            data[k] = json.loads(data[k])
        data["cancel_requested"] = bool(data["cancel_requested"])
        return Job(**data)

    @staticmethod
    def _encode(values: dict[str, Any]) -> dict[str, Any]:
        return {k: json.dumps(v) if k in JSON_FIELDS else v for k, v in values.items()}

    def _insert(self, job: Job) -> None:
        row = self._encode(asdict(job))
        with self._lock, self._conn() as conn:
            conn.execute(
                f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )

    def _get(self, job_id: str) -> Job | None:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row(row) if row else None

    def _set(self, conn: sqlite3.Connection, job_id: str, values: dict[str, Any]) -> None:
        values = self._encode({**values, "updated_unix": time.time()})
        assert set(values) <= set(JOB_FIELDS)
        conn.execute(
            f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?", (*values.values(), job_id)
        )

    def _transact(self, job_id: str, decide: Callable[[Job], dict[str, Any] | None]) -> Job | None:
        with self._lock, self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")  # the write lock first: no one changes the row between read and write
            try:
                row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    conn.execute("COMMIT")
                    return None
                job = self._row(row)
                values = decide(job)
                if values:
                    self._set(conn, job_id, values)
                    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return self._row(row)

    def _unfinished(self) -> list[Job]:
        with self._conn() as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE status IN ('new', 'queued', 'running')").fetchall()
        return [self._row(r) for r in rows]

    def list(self, limit: int = 100) -> list[Job]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE status != 'new' ORDER BY created_unix DESC LIMIT ?", (limit,)
            ).fetchall()
        return [self._row(r) for r in rows]

    def delete(self, job_id: str) -> None:
        with self._lock, self._conn() as conn:
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def finished(self) -> list[tuple[str, float]]:
        marks = ", ".join("?" * len(TERMINAL))
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT id, updated_unix FROM jobs WHERE status IN ({marks}) ORDER BY created_unix DESC",
                tuple(TERMINAL),
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def heartbeat(self, worker_id: str) -> None:
        with self._lock, self._conn() as conn:
            conn.execute(
                "INSERT INTO workers VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET beat_unix = excluded.beat_unix",
                (worker_id, time.time()),
            )

    def forget_worker(self, worker_id: str) -> None:
        with self._lock, self._conn() as conn:
            conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def alive_workers(self) -> list[str]:
        cutoff = time.time() - self.settings.worker_timeout_s
        with self._lock, self._conn() as conn:
            # Rows of long-dead workers go; their jobs were failed by earlier reaps.
            conn.execute("DELETE FROM workers WHERE beat_unix < ?", (cutoff - 100 * self.settings.worker_timeout_s,))
            rows = conn.execute("SELECT id FROM workers WHERE beat_unix >= ?", (cutoff,)).fetchall()
        return [r[0] for r in rows]


class QueueConfigError(SecretConfigError):
    """The queue cannot be used safely as configured."""


def make_huey(settings: JobSettings) -> Huey:
    if settings.redis_url:
        if settings.queue_secret is None or not settings.queue_secret.get_secret_value():
            raise QueueConfigError(
                "FLUXSERVE_JOBS_QUEUE_SECRET is required with FLUXSERVE_JOBS_REDIS_URL: "
                "queue messages are signed with it"
            )
        # An example value copied as it is lets whoever reaches Redis forge the messages a worker
        # unpickles: placeholders and weak values are refused, in the facade and the worker alike.
        require_strong_secret(
            "FLUXSERVE_JOBS_QUEUE_SECRET (compose env file: FLUXSERVE_QUEUE_SECRET)",
            settings.queue_secret.get_secret_value(),
        )
        if password := urlsplit(settings.redis_url).password:
            require_strong_secret(
                "the password in FLUXSERVE_JOBS_REDIS_URL (compose env file: REDIS_PASSWORD)", unquote(password)
            )
        serializer = SignedSerializer(secret=settings.queue_secret.get_secret_value(), salt="fluxserve-jobs")
        return RedisHuey("fluxserve-training", url=settings.redis_url, serializer=serializer)
    settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    return SqliteHuey("fluxserve-training", filename=str(settings.jobs_dir / "queue.sqlite"))


def job_dir(settings: JobSettings, job_id: str) -> Path:
    return settings.jobs_dir / job_id
