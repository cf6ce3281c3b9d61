"""A job's life in the store: new -> queued -> running -> succeeded | failed | cancelled, each step
atomic, so the facade and a worker (or two workers) never both act on one job. (Both backends,
heartbeats and the reaper: tests/integration/test_job_store.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from training.jobs import JobSettings, JobStore, SqliteJobStore


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return SqliteJobStore(JobSettings(jobs_dir=tmp_path, worker_timeout_s=60))


def queued(store: JobStore, kind: str = "classifier", params: dict | None = None) -> str:
    job = store.create(kind, params or {})
    store.mark_queued(job.id)
    return job.id


def test_a_job_starts_once(store: JobStore) -> None:
    job_id = queued(store, params={"train": {}})
    assert store.get(job_id).status == "queued"
    assert store.start(job_id, "w1") is True
    assert store.start(job_id, "w2") is False  # a second worker does not run it again
    assert (store.get(job_id).status, store.get(job_id).worker) == ("running", "w1")


def test_cancelling_a_queued_job_means_it_never_starts(store: JobStore) -> None:
    job_id = queued(store)
    assert store.cancel(job_id)[0].status == "cancelled"
    assert store.start(job_id, "w1") is False


def test_cancelling_a_running_job_flags_it_for_its_next_step(store: JobStore) -> None:
    job_id = queued(store)
    store.start(job_id, "w1")
    after, outcome = store.cancel(job_id)
    assert outcome == "requested"
    assert after.status == "running" and after.cancel_requested and store.cancel_requested(job_id)


def test_running_jobs_of_a_worker_without_heartbeat_fail_with_a_reason(store: JobStore) -> None:
    running, waiting = queued(store), queued(store)
    store.start(running, "gone")  # never heartbeats
    assert [j.id for j in store.reap()] == [running]
    assert store.get(running).status == "failed" and "worker" in store.get(running).error
    assert store.get(waiting).status == "queued"


def test_update_keeps_json_fields_and_lists_newest_first(store: JobStore) -> None:
    first = queued(store, "flux_lora", {"a": 1})
    second = queued(store, "flux_lora")
    store.update(first, progress={"step": 3}, result={"x": [1, 2]})
    job = store.get(first)
    assert (job.params, job.progress, job.result) == ({"a": 1}, {"step": 3}, {"x": [1, 2]})
    assert [j.id for j in store.list(10)] == [second, first]
    assert store.get("no-such-job") is None
