"""Shared fixtures: the real Triton server and the real facade, started as subprocesses.

Servers bind free loopback ports so the suite can run beside a `make up`. The model repository is
the one `make models` builds (the test target depends on it); fixtures that change models copy it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.redis_server import redis_server  # noqa: F401  (a real Redis, as a session fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_models(*names: str) -> None:
    missing = [n for n in names if not (MODEL_REPOSITORY / n / "config.pbtxt").exists()]
    if missing:
        pytest.fail(f"models {missing} are not built: run `make models` (make test does it)")


def start_triton(repo: Path, models: tuple[str, ...] = ("*",), log_name: str | None = None):
    from runtime.launcher import TritonServer, TritonSettings

    http, grpc, metrics = free_port(), free_port(), free_port()
    settings = TritonSettings(
        model_repository=repo, http_port=http, grpc_port=grpc, metrics_port=metrics, models=models,
        log_file=PROJECT_ROOT / "build" / "logs" / (log_name or f"test-triton-{grpc}.log"),
    )
    return TritonServer(settings).start()


@pytest.fixture(scope="session")
def triton() -> Iterator[object]:
    """Triton serving the built default repository (classify + generate, when built)."""
    require_models("classify")
    server = start_triton(MODEL_REPOSITORY, log_name="test-triton-session.log")
    yield server
    server.stop()


class Facade:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path) -> None:
        self.proc, self.url, self.log_path = proc, url, log_path

    def client(self, timeout_s: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_facade(triton_grpc_url: str, extra_env: dict[str, str] | None = None, ready_path: str = "/healthz") -> Facade:
    port = free_port()
    env = {**os.environ, "FLUXSERVE_API_PORT": str(port), "FLUXSERVE_API_TRITON_GRPC_URL": triton_grpc_url, **(extra_env or {})}
    log_path = PROJECT_ROOT / "build" / "logs" / f"test-facade-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "api.app"], cwd=PROJECT_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"facade exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + ready_path, timeout=1).status_code == 200:
                return Facade(proc, url, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"facade not up in 60s: {log_path.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def facade(triton) -> Iterator[Facade]:
    f = start_facade(triton.grpc_url, ready_path="/readyz")
    yield f
    f.stop()


def triton_metric(metrics_url: str, name: str, model: str) -> float:
    """Sum of a Triton metric over all versions of `model` (Prometheus text format)."""
    total = 0.0
    for line in httpx.get(metrics_url, timeout=5).text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
