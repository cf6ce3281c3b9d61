"""The job store's state machine, heartbeats and reaper, on both backends: SQLite (embedded
default) and a real Redis server (tests/redis_server.py). Same tests, same expectations."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from export.flux.settings import EXPORT_MARKER
from publish.publish_lock import repository_lock
from training.jobs import NEVER_QUEUED, WORKER_LOST, JobSettings, JobStore, SqliteJobStore
from training.redis_jobs import RedisJobStore
from training.retention import prune_exports, prune_finished_jobs, prune_orphan_folders, sweep
from training.tasks import publish_lock

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path: Path):
    def make(**overrides) -> JobStore:
        settings = JobSettings(jobs_dir=tmp_path / "jobs", **overrides)
        if request.param == "sqlite":
            return SqliteJobStore(settings)
        server = request.getfixturevalue("redis_server")
        return RedisJobStore(settings.model_copy(update={"redis_url": server.url}))

    if request.param == "redis":
        request.getfixturevalue("redis_server").flush()
    return make


def test_a_record_is_invisible_until_queued_and_runs_on_one_worker(make_store) -> None:
    store = make_store()
    job = store.create("classifier", {"train": {}})
    assert store.get(job.id) is None and store.list() == []  # not enqueued yet
    assert store.waiting() == 1
    store.mark_queued(job.id)
    assert store.get(job.id).status == "queued"
    assert [j.id for j in store.list()] == [job.id]

    wins = []
    barrier = threading.Barrier(4)

    def take(worker: str) -> None:
        barrier.wait()
        if store.start(job.id, worker):
            wins.append(worker)

    threads = [threading.Thread(target=take, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    running = store.get(job.id)
    assert (running.status, running.worker, running.phase) == ("running", wins[0], "training")
    store.mark_queued(job.id)  # a late facade does not move a running job back
    assert store.get(job.id).status == "running"


def test_cancel_rules(make_store) -> None:
    store = make_store()
    waiting, training, publishing = (store.create("classifier", {}) for _ in range(3))
    for j in (waiting, training, publishing):
        store.mark_queued(j.id)
    store.start(training.id, "w")
    store.start(publishing.id, "w")
    assert store.begin_publish(publishing.id)

    job, outcome = store.cancel(waiting.id)
    assert (outcome, job.status) == ("cancelled", "cancelled")
    assert store.start(waiting.id, "w") is False  # the worker skips it
    job, outcome = store.cancel(training.id)
    assert (outcome, job.status, job.cancel_requested) == ("requested", "running", True)
    assert store.begin_publish(training.id) is False  # a cancel before publishing wins
    job, outcome = store.cancel(publishing.id)
    assert (outcome, job.cancel_requested) == ("publishing", False)  # answered 409, publish goes on
    assert store.cancel(waiting.id)[1] == "finished"
    assert store.cancel("nope") == (None, "missing")


def test_reaper_fails_only_the_lost_workers_jobs(make_store) -> None:
    store = make_store(worker_timeout_s=1.0)
    jobs = {}
    for worker in ("lost", "alive"):
        store.heartbeat(worker)
        jobs[worker] = store.create("classifier", {})
        store.mark_queued(jobs[worker].id)
        assert store.start(jobs[worker].id, worker)
    waiting = store.create("classifier", {})
    store.mark_queued(waiting.id)

    deadline = time.monotonic() + 30
    while store.get(jobs["lost"].id).status == "running":
        assert time.monotonic() < deadline, "the lost worker's job was never reaped"
        store.heartbeat("alive")  # only "alive" keeps beating
        store.reap()
        time.sleep(0.1)
    assert store.alive_workers() == ["alive"]
    lost = store.get(jobs["lost"].id)
    assert (lost.status, lost.error) == ("failed", WORKER_LOST)
    assert store.get(jobs["alive"].id).status == "running"
    assert store.get(waiting.id).status == "queued"  # waiting jobs belong to no worker


def test_a_record_never_enqueued_is_failed_after_the_submit_timeout(make_store) -> None:
    store = make_store(submit_timeout_s=0.0)
    job = store.create("classifier", {})
    assert [j.id for j in store.reap()] == [job.id]
    failed = store.get(job.id)
    assert (failed.status, failed.error) == ("failed", NEVER_QUEUED)


def _finished_job(store: JobStore, status: str = "succeeded") -> str:
    job = store.create("classifier", {})
    store.mark_queued(job.id)
    store.start(job.id, "w")
    store.update(job.id, status=status)
    return job.id


def _folder(settings: JobSettings, name: str) -> Path:
    folder = settings.jobs_dir / name
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"x")
    return folder


def test_finished_jobs_are_deleted_with_their_folders_after_retention(make_store) -> None:
    store = make_store(retention_s=3600.0)
    settings = store.settings
    done, failed = _finished_job(store), _finished_job(store, "failed")
    running = store.create("classifier", {})
    store.mark_queued(running.id)
    store.start(running.id, "w")
    queued, new = store.create("classifier", {}), store.create("classifier", {})
    store.mark_queued(queued.id)
    kept = [running.id, queued.id, new.id]
    for name in (done, failed, *kept, "orphan-upload"):
        _folder(settings, name)
    # Younger than the retention: nothing goes.
    assert prune_finished_jobs(settings, store) == [] and prune_orphan_folders(settings, store) == []
    later = time.time() + 2 * 3600
    assert sorted(prune_finished_jobs(settings, store, now=later)) == sorted([done, failed])
    assert store.record(done) is None and store.record(failed) is None  # the records go too
    assert not (settings.jobs_dir / done).exists() and not (settings.jobs_dir / failed).exists()
    assert prune_orphan_folders(settings, store, now=later) == ["orphan-upload"]
    # Unfinished jobs stay whatever their age, records and folders.
    assert [store.record(j).status for j in kept] == ["running", "queued", "new"]
    assert all((settings.jobs_dir / j / "model.onnx").exists() for j in kept)
    assert sorted(j.id for j in store.list()) == sorted([running.id, queued.id])
    assert store.finished() == []


def test_only_the_newest_finished_jobs_are_kept(make_store) -> None:
    store = make_store(max_finished_jobs=2)
    running = store.create("classifier", {})  # the oldest: never counted, never deleted
    store.mark_queued(running.id)
    store.start(running.id, "w")
    finished = [_finished_job(store, status) for status in ("succeeded", "failed", "cancelled", "succeeded")]
    for job_id in finished:
        _folder(store.settings, job_id)
    assert [j for j, _ in store.finished()] == finished[::-1]  # newest first
    assert sorted(prune_finished_jobs(store.settings, store)) == sorted(finished[:2])
    assert [j.id for j in store.list()] == [finished[3], finished[2], running.id]
    assert not any((store.settings.jobs_dir / j).exists() for j in finished[:2])
    assert all((store.settings.jobs_dir / j).exists() for j in finished[2:])
    assert prune_finished_jobs(store.settings, store) == []  # at the cap, nothing more goes


def test_a_forged_job_id_deletes_no_folder_outside_the_jobs_folder(make_store, tmp_path: Path) -> None:
    """Whoever can write to the store (Redis) might plant a record whose id is a path."""
    store = make_store(max_finished_jobs=0)
    store.settings.jobs_dir.mkdir(parents=True, exist_ok=True)  # so that `jobs/../victim` resolves
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    forged = store.create("classifier", {}, job_id="../victim")
    store.update(forged.id, status="failed")
    assert prune_finished_jobs(store.settings, store) == [forged.id]
    assert store.record(forged.id) is None  # the record goes; the folder it names stays
    assert (victim / "keep").is_dir()


def test_the_export_sweep_waits_for_a_running_publish(make_store, tmp_path: Path) -> None:
    """The sweep deletes no export while a publish holds its lock (it may be about to link that
    export into the repository): the file lock on one machine, the Redis lock across machines."""
    store = make_store(retention_s=0.0, model_repository=tmp_path / "repo")
    settings = store.settings
    export_root = tmp_path / "export"
    unused = export_root / "flux_transformer" / "abc"
    unused.mkdir(parents=True)
    (unused / "model.onnx").write_bytes(b"onnx")
    (unused / EXPORT_MARKER).write_text("{}")
    held = publish_lock(settings) if settings.redis_url else repository_lock(settings.model_repository)
    with held:  # what a publish holds (the Redis lock alone is enough to hold the sweep off)
        assert prune_exports(settings, export_root) is None
        sweep(settings, store, export_root)  # the rest of the sweep runs; the exports wait
        assert unused.exists()
    assert prune_exports(settings, export_root) == [unused]
    assert not unused.exists()


# A finished job's record is final: a worker that finishes a job the reaper already failed cannot
# turn it into `succeeded`, and no write moves a succeeded, failed or cancelled job anywhere else.
STATUSES = ("new", "queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("cancelled", "failed", "succeeded")


def _running(store: JobStore, worker: str = "w") -> str:
    job = store.create("classifier", {})
    store.mark_queued(job.id)
    assert store.start(job.id, worker)
    return job.id


def test_a_job_failed_as_worker_lost_stays_failed_when_its_worker_finishes(make_store) -> None:
    store = make_store()
    job_id = _running(store, "busy")  # "busy" never heartbeats here: the reaper takes it for lost
    assert [j.id for j in store.reap()] == [job_id]
    assert store.cancel_requested(job_id)  # the trainer's next step check stops it

    # The worker comes back with its outcome: refused, whatever the route.
    assert store.finish(job_id, "busy", "succeeded", result={"model_version": "7"}) is False
    assert store.update(job_id, status="succeeded", result={"model_version": "7"}) is False
    assert store.update(job_id, progress={"step": 9}) is False
    assert store.start(job_id, "other") is False
    store.mark_queued(job_id)
    assert store.cancel(job_id)[1] == "finished"
    job = store.get(job_id)
    assert (job.status, job.error, job.result, job.progress) == ("failed", WORKER_LOST, {}, {})
    assert store.waiting() == 0 and store.reap() == []


@pytest.mark.parametrize("final", FINAL)
def test_every_finished_status_is_final(make_store, final: str) -> None:
    store = make_store()
    job_id = _running(store)
    assert store.finish(job_id, "w", final, error=None if final == "succeeded" else "x")
    written = store.get(job_id).updated_unix
    for status in STATUSES:
        assert store.update(job_id, status=status) is False
    for status in FINAL:
        assert store.finish(job_id, "w", status) is False
    assert (store.get(job_id).status, store.get(job_id).updated_unix) == (final, written)  # nothing written


def test_only_the_running_worker_finishes_its_job(make_store) -> None:
    store = make_store()
    job_id = _running(store, "mine")
    assert store.finish(job_id, "someone-else", "succeeded") is False
    assert store.get(job_id).status == "running"
    assert store.finish(job_id, "mine", "succeeded", result={"ok": True})
    assert (store.get(job_id).status, store.get(job_id).result) == ("succeeded", {"ok": True})


def test_the_reaper_and_a_finishing_worker_race_to_one_outcome(make_store) -> None:
    """Both at once, many times: exactly one wins, and the other's write never lands after it."""
    store = make_store()
    for _ in range(10):
        job_id = _running(store, "racing")
        barrier = threading.Barrier(2)
        finished: list[bool] = []

        def finish() -> None:
            barrier.wait()
            finished.append(store.finish(job_id, "racing", "succeeded", result={"v": 1}))

        def reap() -> None:
            barrier.wait()
            store.reap()

        threads = [threading.Thread(target=finish), threading.Thread(target=reap)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        job = store.get(job_id)
        if finished == [True]:
            assert (job.status, job.result) == ("succeeded", {"v": 1})
        else:
            assert (job.status, job.error, job.result) == ("failed", WORKER_LOST, {})
