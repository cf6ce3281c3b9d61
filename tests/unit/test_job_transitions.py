"""A job's life in the store: queued -> running -> succeeded | failed | cancelled, each step atomic,
so the facade and a worker (or two workers) never both act on one job."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.jobs import JobStore


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite")


def test_a_job_starts_once(store: JobStore) -> None:
    job = store.create("classifier", {"train": {}})
    assert store.get(job.id).status == "queued"
    assert store.start(job.id) is True
    assert store.start(job.id) is False  # a second worker does not run it again
    assert store.get(job.id).status == "running"


def test_cancelling_a_queued_job_means_it_never_starts(store: JobStore) -> None:
    job = store.create("classifier", {})
    assert store.cancel(job.id).status == "cancelled"
    assert store.start(job.id) is False


def test_cancelling_a_running_job_flags_it_for_its_next_step(store: JobStore) -> None:
    job = store.create("classifier", {})
    store.start(job.id)
    after = store.cancel(job.id)
    assert after.status == "running" and after.cancel_requested and store.cancel_requested(job.id)


def test_orphaned_running_jobs_fail_with_a_reason(store: JobStore) -> None:
    running, queued = store.create("classifier", {}), store.create("classifier", {})
    store.start(running.id)
    assert store.fail_orphans() == 1
    assert store.get(running.id).status == "failed" and "worker" in store.get(running.id).error
    assert store.get(queued.id).status == "queued"


def test_update_keeps_json_fields_and_lists_newest_first(store: JobStore) -> None:
    first = store.create("flux_lora", {"a": 1})
    second = store.create("flux_lora", {})
    store.update(first.id, progress={"step": 3}, result={"x": [1, 2]})
    job = store.get(first.id)
    assert (job.params, job.progress, job.result) == ({"a": 1}, {"step": 3}, {"x": [1, 2]})
    assert [j.id for j in store.list(10)] == [second.id, first.id]
    assert store.get("no-such-job") is None
