"""Issue 26 item 2: with the old example values (or any placeholder) the facade, the worker and the
Triton launcher's key check refuse to start, naming the variable to set; good values start."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import pytest

from client.control_key import ControlKeyError, ControlKeySettings, ensure_control_key
from common.secret_strength import SecretConfigError
from training.jobs import JobSettings, make_huey

REDIS = "redis://queue.internal:6390/3"
OLD_EXAMPLE = {
    "REDIS_PASSWORD": "change-me",
    "FLUXSERVE_QUEUE_SECRET": "change-me-too",
    "FLUXSERVE_API_KEYS": "operator:change-me-change-me",
    "FLUXSERVE_TRITON_CONTROL_KEY": "change-me",
}
"""deploy/compose/env.example before issue 26: every value worked as a real secret."""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path: Path) -> None:
    for name in ("FLUXSERVE_JOBS_REDIS_URL", "FLUXSERVE_JOBS_QUEUE_SECRET", "FLUXSERVE_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLUXSERVE_TRITON_CONTROL_KEY", secrets.token_urlsafe(32))
    monkeypatch.setenv("FLUXSERVE_JOBS_JOBS_DIR", str(tmp_path / "jobs"))


@pytest.mark.parametrize("secret", [OLD_EXAMPLE["FLUXSERVE_QUEUE_SECRET"], "s3cret", "my-queue-secret-for-prod"])
def test_queue_refuses_a_placeholder_secret(tmp_path: Path, secret: str) -> None:
    with pytest.raises(
        SecretConfigError, match=r"^FLUXSERVE_JOBS_QUEUE_SECRET \(compose env file: FLUXSERVE_QUEUE_SECRET\)"
    ):
        make_huey(JobSettings(jobs_dir=tmp_path, redis_url=REDIS, queue_secret=secret))


@pytest.mark.parametrize("password", [OLD_EXAMPLE["REDIS_PASSWORD"], "short", "change%2Dme%2Dchange%2Dme"])
def test_queue_refuses_a_placeholder_redis_password(tmp_path: Path, password: str) -> None:
    url = f"redis://:{password}@redis:6379/0"
    with pytest.raises(
        SecretConfigError, match=r"^the password in FLUXSERVE_JOBS_REDIS_URL \(compose env file: REDIS_PASSWORD\)"
    ):
        make_huey(JobSettings(jobs_dir=tmp_path, redis_url=url, queue_secret=secrets.token_hex(24)))


def test_queue_takes_strong_values(tmp_path: Path) -> None:
    url = f"redis://:{secrets.token_hex(24)}@redis:6379/0"
    make_huey(JobSettings(jobs_dir=tmp_path, redis_url=url, queue_secret=secrets.token_hex(24)))  # no error
    make_huey(JobSettings(jobs_dir=tmp_path, redis_url=REDIS, queue_secret=secrets.token_hex(24)))  # no password


def never(*args: object, **kwargs: object) -> None:
    raise AssertionError("started although a secret is a placeholder")


def test_worker_refuses_to_start_naming_the_variable(monkeypatch, caplog) -> None:
    from training import worker

    monkeypatch.setattr(worker, "Heartbeat", never)

    monkeypatch.setenv("FLUXSERVE_JOBS_REDIS_URL", f"redis://:{OLD_EXAMPLE['REDIS_PASSWORD']}@127.0.0.1:9/0")
    monkeypatch.setenv("FLUXSERVE_JOBS_QUEUE_SECRET", OLD_EXAMPLE["FLUXSERVE_QUEUE_SECRET"])
    with caplog.at_level(logging.ERROR, logger="training.worker"):
        assert worker.main() == 2  # before any connection: nothing listens on port 9
    assert "not starting: FLUXSERVE_JOBS_QUEUE_SECRET" in caplog.text and "change-me" not in caplog.text


def test_worker_refuses_a_placeholder_control_key(monkeypatch, caplog) -> None:
    from training import worker

    monkeypatch.setattr(worker, "Heartbeat", never)

    monkeypatch.setenv("FLUXSERVE_TRITON_CONTROL_KEY", "change-me-to-a-long-random-value")
    with caplog.at_level(logging.ERROR, logger="training.worker"):
        assert worker.main() == 2
    assert "FLUXSERVE_TRITON_CONTROL_KEY" in caplog.text and "placeholder" in caplog.text


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FLUXSERVE_API_KEYS", OLD_EXAMPLE["FLUXSERVE_API_KEYS"]),
        ("FLUXSERVE_TRITON_CONTROL_KEY", OLD_EXAMPLE["FLUXSERVE_TRITON_CONTROL_KEY"]),
        ("FLUXSERVE_TRITON_CONTROL_KEY", "change-me-to-a-long-random-value"),
    ],
)
def test_facade_refuses_to_start_naming_the_variable(monkeypatch, caplog, variable: str, value: str) -> None:
    import uvicorn

    from api import app

    monkeypatch.setattr(uvicorn.Server, "run", never)
    monkeypatch.setenv("FLUXSERVE_API_KEYS", f"ops:{secrets.token_hex(24)}")
    monkeypatch.setenv(variable, value)
    with caplog.at_level(logging.ERROR, logger="api.app"), pytest.raises(SystemExit) as exit_:
        app.main()
    assert exit_.value.code == 2
    assert f"not starting: {variable}" in caplog.text and value.split(":")[-1] not in caplog.text


@pytest.mark.parametrize("key", ["change-me-to-a-long-random-value", "a" * 32, "CHANGE_ME_0123456789_abcdef"])
def test_launcher_key_check_refuses_long_placeholders(tmp_path: Path, key: str) -> None:
    # The launcher starts Triton with ensure_control_key(): these used to pass its length rule.
    settings = ControlKeySettings(control_key=key, control_key_file=tmp_path / "triton_control_key")
    with pytest.raises(ControlKeyError, match="^FLUXSERVE_TRITON_CONTROL_KEY: the Triton control key is unusable"):
        ensure_control_key(settings)
    assert not settings.control_key_file.exists()
