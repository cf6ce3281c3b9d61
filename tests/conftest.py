"""Shared fixtures: the real Triton server and the real facade, started as subprocesses.

Servers bind free loopback ports so the suite can run beside a `make up`. The model repository is
the one `make models` builds (the test target depends on it); fixtures that change models copy it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from common.paths import MODEL_REPOSITORY, PROJECT_ROOT  # noqa: F401  (tests import them from here)
from runtime import processes
from runtime.launcher import TritonServer
from runtime.processes import HttpServer, free_port  # noqa: F401  (tests import it from here)
from tests.redis_server import redis_server  # noqa: F401  (a real Redis, as a session fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every test Triton (and every stack a test starts) drains for at most 5 s on stop instead of
# production's 30: after a reload or a killed stub, Triton waits out the whole timeout for an
# instance that never reports unloaded, and no test sends work that takes longer than 5 s to finish.
os.environ.setdefault("FLUXSERVE_TRITON_EXIT_TIMEOUT_S", "5")


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.25) -> object:
    """`condition()`'s first truthy value, polled every `every_s`; the test fails naming `what`
    when none comes within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"not within {timeout_s:.0f}s: {what}")


@asynccontextmanager
async def uvicorn_serving(app: object, http: type) -> AsyncIterator[int]:
    """A real uvicorn serving `app` with the protocol class `http` on a free loopback port (yielded),
    in the running event loop, for protocol tests (api/slow_clients.py)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), http=http, log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield config.port
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task


TEST_API_KEY = "test-" + secrets.token_urlsafe(24)
"""The operator key every facade the tests start accepts (as FLUXSERVE_API_KEYS `tests:<key>`)."""


REAL_STACK_DIRS = ("integration", "e2e", "compose")
"""Tests that start real servers (Triton, the facade, workers, Redis, a browser) and share them as
session fixtures. `make test` runs them in a pytest of their own, beside the in-process tests at
the lowest CPU priority (tests/run_suite.py, whose REAL_STACK names the same folders); under xdist
(`-n 2 --dist loadgroup`, not make test's way: on 2 cores the workers starved each other) they stay
on one worker, in order."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).parent
    for item in items:
        if item.path.relative_to(tests_dir).parts[0] in REAL_STACK_DIRS:
            item.add_marker(pytest.mark.xdist_group("real-stack"))


def require_models(*names: str) -> None:
    missing = [n for n in names if not (MODEL_REPOSITORY / n / "config.pbtxt").exists()]
    if missing:
        pytest.fail(f"models {missing} are not built: run `make models` (make test does it)")


def start_triton(repo: Path, models: tuple[str, ...] = ("*",), log_name: str | None = None) -> TritonServer:
    return processes.start_triton(repo, models, tag=(log_name or "test-triton").removesuffix(".log"))


@pytest.fixture(scope="session")
def triton() -> Iterator[object]:
    """Triton serving the built default repository (classify + generate, when built)."""
    require_models("classify")
    server = start_triton(MODEL_REPOSITORY, log_name="test-triton-session.log")
    yield server
    server.stop()


class Facade:
    """A facade under test: its process, and clients that send the test operator key by default."""

    def __init__(self, server: HttpServer) -> None:
        self.server, self.proc, self.url, self.log_path = server, server.proc, server.url, server.log_path

    def client(self, timeout_s: float = 60.0, api_key: str | None = TEST_API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)

    def stop(self) -> None:
        self.server.stop()


def start_facade(triton_grpc_url: str, extra_env: dict[str, str] | None = None, ready_path: str = "/healthz") -> Facade:
    env = {"FLUXSERVE_API_KEYS": f"tests:{TEST_API_KEY}", **(extra_env or {})}
    return Facade(processes.start_facade(triton_grpc_url, env, ready_path))


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
