"""Shared fixtures: the real Triton server and the real facade, started as subprocesses.

Servers bind free loopback ports so the suite can run beside a `make up`. The model repository is
the one `make models` builds (the test target depends on it); fixtures that change models copy it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runtime import processes
from runtime.launcher import TritonServer
from runtime.processes import HttpServer, free_port  # noqa: F401  (tests import it from here)
from common.paths import MODEL_REPOSITORY, PROJECT_ROOT  # noqa: F401  (tests import them from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")



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


Facade = HttpServer


def start_facade(triton_grpc_url: str, extra_env: dict[str, str] | None = None, ready_path: str = "/healthz") -> HttpServer:
    return processes.start_facade(triton_grpc_url, extra_env, ready_path)


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
