"""A job's life in the store: new -> queued -> running -> succeeded | failed | cancelled, each step
atomic, so the facade and a worker (or two workers) never both act on one job. (Both backends,
heartbeats and the reaper: tests/integration/test_job_store.py.)"""

from __future__ import annotations

import threading
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


def test_a_job_the_reaper_failed_meanwhile_is_not_turned_into_succeeded(store: JobStore, monkeypatch) -> None:
    """The worker was taken for lost while it ran (its job failed "worker lost"), then finishes:
    the failed record stands; the run's outcome is only logged."""
    from training import tasks
    from training.jobs import WORKER_LOST

    def runner(settings: JobSettings, store_: JobStore, job_id: str, params: dict) -> dict:
        assert [j.id for j in store_.reap()] == [job_id]  # "w" never heartbeats: lost, to the reaper
        return {"model_version": "2"}

    monkeypatch.setitem(tasks.RUNNERS, "classifier", runner)
    job_id = queued(store)
    tasks._run_job(store.settings, store, job_id, "w")
    job = store.get(job_id)
    assert (job.status, job.error, job.result) == ("failed", WORKER_LOST, {})


class CountingStore(SqliteJobStore):
    def __init__(self, settings: JobSettings) -> None:
        super().__init__(settings)
        self.beats = 0
        self.beat = threading.Condition()

    def heartbeat(self, worker_id: str) -> None:
        super().heartbeat(worker_id)
        with self.beat:
            self.beats += 1
            self.beat.notify_all()


def test_a_worker_keeps_beating_while_its_housekeeping_is_stuck(tmp_path: Path, monkeypatch) -> None:
    """Housekeeping (here a reap stuck as a model reload after a dead peer's publish would be)
    runs beside the beat, not in it: the worker stays alive, and its running job is not reaped."""
    from training import liveness

    settings = JobSettings(jobs_dir=tmp_path, heartbeat_interval_s=0.02, worker_timeout_s=0.3)
    store = CountingStore(settings)
    stuck, release = threading.Event(), threading.Event()

    def slow_reap(store_: JobStore, settings_: JobSettings) -> list:
        stuck.set()
        release.wait(10)  # bounded, so the old code (reaping on the beat's thread) fails, not hangs
        return []

    monkeypatch.setattr(liveness, "reap", slow_reap)
    monkeypatch.setattr(liveness.Heartbeat, "_prune", lambda self: None)  # no sweep of real folders
    try:
        with liveness.Heartbeat(store, settings, housekeeping=True) as beat:
            job_id = queued(store)
            assert store.start(job_id, beat.worker_id)
            assert stuck.wait(10)
            # Beats over several worker timeouts while housekeeping stays stuck.
            with store.beat:
                target = store.beats + int(4 * settings.worker_timeout_s / settings.heartbeat_interval_s)
                assert store.beat.wait_for(lambda: store.beats >= target, timeout=5), store.beats
            assert not release.is_set() and beat.worker_id in store.alive_workers()
            assert store.reap() == [] and store.get(job_id).status == "running"
            release.set()  # before the exit, which waits a little for housekeeping to end
    finally:
        release.set()
