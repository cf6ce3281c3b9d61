"""The job queue backend follows FLUXSERVE_JOBS_REDIS_URL: embedded SQLite by default, Redis to
share one queue between worker machines."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from huey import RedisHuey, SqliteHuey
from huey.serializer import SignedSerializer

from training.jobs import JobSettings, QueueConfigError, make_huey


def test_default_queue_is_embedded_sqlite_in_the_jobs_folder(tmp_path: Path) -> None:
    huey = make_huey(JobSettings(jobs_dir=tmp_path / "jobs"))
    assert isinstance(huey, SqliteHuey)
    assert Path(huey.storage.filename) == tmp_path / "jobs" / "queue.sqlite"


def test_redis_url_switches_the_queue_to_redis(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FLUXSERVE_JOBS_REDIS_URL", "redis://queue.internal:6390/3")
    monkeypatch.setenv("FLUXSERVE_JOBS_QUEUE_SECRET", secrets.token_hex(24))
    huey = make_huey(JobSettings(jobs_dir=tmp_path))
    assert isinstance(huey, RedisHuey)
    kwargs = huey.storage.pool.connection_kwargs  # parsed from the URL; nothing is dialled yet
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("queue.internal", 6390, 3)
    assert not (tmp_path / "queue.sqlite").exists()
    assert isinstance(huey.serializer, SignedSerializer)  # whoever writes to Redis cannot run code


def test_redis_queue_without_a_secret_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FLUXSERVE_JOBS_REDIS_URL", "redis://queue.internal:6390/3")
    with pytest.raises(QueueConfigError, match="QUEUE_SECRET"):
        make_huey(JobSettings(jobs_dir=tmp_path))


def test_every_kind_of_job_has_a_runner() -> None:
    """The kinds POST /train accepts (contract.specs.JOB_KINDS) are exactly the ones a worker runs."""
    from contract.specs import JOB_KINDS
    from training.tasks import RUNNERS

    assert set(RUNNERS) == set(JOB_KINDS)
