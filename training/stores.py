"""The job store a process uses: SQLite (training.jobs, the embedded default) or Redis
(training.redis_jobs) when FLUXSERVE_JOBS_REDIS_URL is set. Apart from both backends so that
neither imports the other."""

from __future__ import annotations

from training.jobs import JobSettings, JobStore, SqliteJobStore
from training.redis_jobs import RedisJobStore


def job_store(settings: JobSettings) -> JobStore:
    if settings.redis_url:
        return RedisJobStore(settings)
    return SqliteJobStore(settings)
