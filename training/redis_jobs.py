"""Job records and worker heartbeats in Redis (FLUXSERVE_JOBS_REDIS_URL): the same JobStore as
SQLite, for workers on several machines that share only Redis and the model repository.

Keys (prefix `fluxserve:jobs:`):
    job:<id>        hash: one field per Job field, JSON-encoded
    index           sorted set: job id -> created_unix (listing, newest first)
    unfinished      set: ids in new/queued/running (what the reaper scans)
    worker:<id>     heartbeat, with a TTL of worker_timeout_s: liveness is judged by Redis's clock,
                    so workers' clocks need not agree
    publish-lock    the cross-machine publish lock (publish.publish_lock.redis_lock)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import redis

from training.jobs import JOB_FIELDS, TERMINAL, Job, JobSettings, JobStore

PREFIX = "fluxserve:jobs:"
PUBLISH_LOCK_KEY = PREFIX + "publish-lock"
FINISHED_PAGE = 500


def redis_client(url: str) -> redis.Redis:
    # Bounded waits: a Redis that does not answer is an error, not a hang.
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10, health_check_interval=30)


class RedisJobStore(JobStore):
    def __init__(self, settings: JobSettings, client: redis.Redis | None = None) -> None:
        super().__init__(settings)
        assert settings.redis_url or client is not None
        self.r = client or redis_client(settings.redis_url or "")

    @staticmethod
    def _key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def _encode(values: dict[str, Any]) -> dict[str, str]:
        return {k: json.dumps(v) for k, v in values.items()}

    @staticmethod
    def _decode(raw: dict[bytes, bytes]) -> Job | None:
        if not raw:
            return None
        data = {k.decode(): json.loads(v) for k, v in raw.items()}
        return Job(**{k: v for k, v in data.items() if k in JOB_FIELDS})

    def _insert(self, job: Job) -> None:
        with self.r.pipeline() as pipe:  # MULTI/EXEC: the record and its index entries together
            pipe.hset(self._key(job.id), mapping=self._encode(asdict(job)))
            pipe.zadd(PREFIX + "index", {job.id: job.created_unix})
            pipe.sadd(PREFIX + "unfinished", job.id)
            pipe.execute()

    def _get(self, job_id: str) -> Job | None:
        return self._decode(self.r.hgetall(self._key(job_id)))

    def _write(self, pipe: Any, job_id: str, values: dict[str, Any]) -> None:
        pipe.hset(self._key(job_id), mapping=self._encode({**values, "updated_unix": time.time()}))
        if values.get("status") in TERMINAL:
            pipe.srem(PREFIX + "unfinished", job_id)

    def _transact(self, job_id: str, decide: Callable[[Job], dict[str, Any] | None]) -> Job | None:
        key = self._key(job_id)
        result: list[Job | None] = [None]

        def attempt(pipe: Any) -> None:  # WATCH key; a concurrent write makes EXEC fail and redis-py retry
            job = self._decode(pipe.hgetall(key))
            result[0] = job
            if job is None:
                return
            values = decide(job)
            pipe.multi()
            if values:
                self._write(pipe, job_id, values)
                result[0] = Job(**{**asdict(job), **values})

        self.r.transaction(attempt, key)
        return result[0]

    def _unfinished(self) -> list[Job]:
        ids = [i.decode() for i in self.r.smembers(PREFIX + "unfinished")]
        jobs = [self._get(i) for i in ids]
        return [j for j in jobs if j is not None and j.status not in TERMINAL]

    def list(self, limit: int = 100) -> list[Job]:
        jobs: list[Job] = []
        start = 0
        while len(jobs) < limit:  # `new` records are skipped, so page until enough are found
            ids = self.r.zrevrange(PREFIX + "index", start, start + limit - 1)
            if not ids:
                break
            start += len(ids)
            with self.r.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.hgetall(self._key(i.decode()))
                found = [self._decode(raw) for raw in pipe.execute()]
            jobs += [j for j in found if j is not None and j.status != "new"]
        return jobs[:limit]

    def delete(self, job_id: str) -> None:
        with self.r.pipeline() as pipe:
            pipe.delete(self._key(job_id))
            pipe.zrem(PREFIX + "index", job_id)
            pipe.srem(PREFIX + "unfinished", job_id)
            pipe.execute()

    def finished(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        start = 0
        while ids := self.r.zrevrange(PREFIX + "index", start, start + FINISHED_PAGE - 1):
            start += len(ids)
            with self.r.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.hmget(self._key(i.decode()), "status", "updated_unix")
                rows = pipe.execute()
            for i, (status, updated) in zip(ids, rows, strict=True):
                if status is None:  # an index entry whose record is gone: reported as long finished
                    out.append((i.decode(), 0.0))
                elif json.loads(status) in TERMINAL:
                    out.append((i.decode(), float(json.loads(updated))))
        return out

    def heartbeat(self, worker_id: str) -> None:
        ttl_ms = max(1, int(self.settings.worker_timeout_s * 1000))
        self.r.set(f"{PREFIX}worker:{worker_id}", time.time(), px=ttl_ms)

    def forget_worker(self, worker_id: str) -> None:
        self.r.delete(f"{PREFIX}worker:{worker_id}")

    def alive_workers(self) -> list[str]:
        prefix = f"{PREFIX}worker:"
        return [k.decode()[len(prefix) :] for k in self.r.scan_iter(match=prefix + "*", count=1000)]
