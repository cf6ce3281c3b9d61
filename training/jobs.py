"""Training jobs: a persistent record store and the queue that carries them to the worker.

* Records (status, progress, result, errors) live in SQLite (`<jobs_dir>/jobs.sqlite`): they
  survive restarts of the facade and the worker, and both processes read/write them.
* The queue is huey: `SqliteHuey` by default (embedded, no server), `RedisHuey` when
  FLUXSERVE_JOBS_REDIS_URL is set, so several worker machines can share one queue.

A job's life: queued -> running -> succeeded | failed | cancelled. Cancelling a queued job marks
it cancelled (the worker skips it); cancelling a running one sets a flag the trainer checks at
every step.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from huey import RedisHuey, SqliteHuey
from huey.api import Huey
from pydantic_settings import BaseSettings, SettingsConfigDict
from common.paths import BUILD_DIR, MODEL_REPOSITORY


JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
JobKind = Literal["flux_lora", "classifier"]


class JobSettings(BaseSettings):
    """Environment prefix: FLUXSERVE_JOBS_."""

    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_JOBS_")

    jobs_dir: Path = BUILD_DIR / "jobs"
    redis_url: str | None = None
    """Use Redis for the queue (several worker machines); default is embedded SQLite."""
    triton_http_url: str = "127.0.0.1:8000"
    """Triton to load re-exported models into (HTTP model-control API)."""
    model_repository: Path = MODEL_REPOSITORY
    base_checkpoint: str | None = None
    """FLUX base to train on and re-export; default: the local checkpoint `make models` builds."""
    max_upload_bytes: int = 200 * 1024 * 1024
    keep_versions: int = 2


@dataclass
class Job:
    id: str
    kind: str
    status: str
    created_unix: float
    updated_unix: float
    params: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    cancel_requested: bool = False

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["job_id"] = data.pop("id")
        return data


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
"""


class JobStore:
    """SQLite-backed job records, safe to share between the facade and worker processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._conn() as conn:
            conn.executescript(_SCHEMA)

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")  # readers (SSE polling) never block the writer
        try:
            yield conn
        finally:
            conn.close()

    @staticmethod
    def _row(row: tuple) -> Job:
        return Job(
            id=row[0], kind=row[1], status=row[2], created_unix=row[3], updated_unix=row[4],
            params=json.loads(row[5]), progress=json.loads(row[6]), result=json.loads(row[7]),
            error=row[8], cancel_requested=bool(row[9]),
        )

    def create(self, kind: str, params: dict[str, Any], job_id: str | None = None) -> Job:
        now = time.time()
        job = Job(id=job_id or uuid.uuid4().hex, kind=kind, status="queued", created_unix=now, updated_unix=now, params=params)
        with self._lock, self._conn() as conn:
            conn.execute(
                "INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job.id, kind, job.status, now, now, json.dumps(params), "{}", "{}", None, 0),
            )
        return job

    def get(self, job_id: str) -> Job | None:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row(row) if row else None

    def list(self, limit: int = 100) -> list[Job]:
        with self._conn() as conn:
            rows = conn.execute("SELECT * FROM jobs ORDER BY created_unix DESC LIMIT ?", (limit,)).fetchall()
        return [self._row(r) for r in rows]

    def update(self, job_id: str, **fields: Any) -> None:
        cols, values = [], []
        for key, value in fields.items():
            cols.append(f"{key} = ?")
            values.append(json.dumps(value) if key in ("params", "progress", "result") else value)
        cols.append("updated_unix = ?")
        values.append(time.time())
        with self._lock, self._conn() as conn:
            conn.execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id = ?", (*values, job_id))

    def start(self, job_id: str) -> bool:
        """queued -> running, atomically; False when the job was cancelled (or already taken)."""
        with self._lock, self._conn() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = 'running', updated_unix = ? WHERE id = ? AND status = 'queued'",
                (time.time(), job_id),
            )
            return cur.rowcount == 1

    def delete(self, job_id: str) -> None:
        with self._lock, self._conn() as conn:
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def cancel(self, job_id: str) -> Job | None:
        """Cancel: a queued job is cancelled now; a running one is flagged to stop at its next step."""
        with self._lock, self._conn() as conn:
            now = time.time()
            conn.execute("UPDATE jobs SET status = 'cancelled', updated_unix = ? WHERE id = ? AND status = 'queued'", (now, job_id))
            conn.execute("UPDATE jobs SET cancel_requested = 1, updated_unix = ? WHERE id = ? AND status = 'running'", (now, job_id))
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._conn() as conn:
            row = conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def fail_orphans(self) -> int:
        """Jobs left 'running' by a worker that died: mark them failed (nothing is silently lost)."""
        with self._lock, self._conn() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = 'failed', error = 'worker stopped while the job was running; resubmit it', updated_unix = ? WHERE status = 'running'",
                (time.time(),),
            )
            return cur.rowcount


def make_huey(settings: JobSettings) -> Huey:
    if settings.redis_url:
        return RedisHuey("fluxserve-training", url=settings.redis_url)
    settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    return SqliteHuey("fluxserve-training", filename=str(settings.jobs_dir / "queue.sqlite"))


def job_store(settings: JobSettings) -> JobStore:
    return JobStore(settings.jobs_dir / "jobs.sqlite")


def job_dir(settings: JobSettings, job_id: str) -> Path:
    return settings.jobs_dir / job_id
