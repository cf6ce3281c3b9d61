"""Start what a benchmark measures, on free loopback ports: Triton, the facade, the baseline.

Processes start through runtime.processes (the one way tests and tools start them), as in production,
and are awaited on their readiness endpoints.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from common.paths import BUILD_DIR, MODEL_REPOSITORY
from contract.specs import CLASSIFIER_ONNX, CLASSIFY, ENDPOINTS, FLUX_COMPONENTS, FLUX_PREPARE, GENERATE
from runtime import processes
from runtime.launcher import TritonServer
from runtime.processes import HttpServer, free_port

log = logging.getLogger(__name__)

LOG_DIR = BUILD_DIR / "logs" / "bench"
__all__ = ["MODEL_REPOSITORY", "LOG_DIR", "triton", "facade", "baseline", "stack_built"]
CLASSIFY_STACK: tuple[str, ...] = (CLASSIFY.name, CLASSIFIER_ONNX.name)
GENERATE_STACK: tuple[str, ...] = (GENERATE.name, FLUX_PREPARE.name, *FLUX_COMPONENTS)


CAPACITY_ENV: dict[str, str] = {
    "FLUXSERVE_ADMISSION_CLASSIFY_MAX_WAIT_S": "60",
    "FLUXSERVE_ADMISSION_GENERATE_MAX_WAIT_S": "600",
}
"""The facade's settings when a benchmark measures capacity at a fixed concurrency: the number of
clients bounds the queue already, and the bounded wait (shedding, measured by `fluxserve-bench
overload`) would turn a busy moment of this shared machine into refused requests."""


def is_built(repo: Path, model: str) -> bool:
    """A model is servable when export wrote its config and at least one version."""
    model_dir = repo / model
    return (model_dir / "config.pbtxt").exists() and any(p.is_dir() and p.name.isdigit() for p in model_dir.iterdir())


def stack_built(repo: Path, stack: Iterable[str]) -> bool:
    return all(is_built(repo, m) for m in stack)


@contextmanager
def triton(repo: Path, models: Iterable[str], log_dir: Path = LOG_DIR, tag: str = "bench") -> Iterator[TritonServer]:
    with processes.triton(repo, models, log_dir, tag) as server:
        yield server


@contextmanager
def facade(
    triton_grpc_url: str,
    required_models: Iterable[str],
    log_dir: Path = LOG_DIR,
    timeout_s: float = 60.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[HttpServer]:
    """The real facade (`python -m api.app`), configured by its FLUXSERVE_API_ environment."""
    with processes.facade(triton_grpc_url, required_models, log_dir, timeout_s, extra_env) as server:
        yield server


@contextmanager
def baseline(
    classifier_dir: Path, with_generate: bool, log_dir: Path = LOG_DIR, timeout_s: float = 300.0
) -> Iterator[HttpServer]:
    """The prototype-style app (benchmarks/baseline_app.py): models in-process, one request at a time."""
    port = free_port()
    args = [
        "-m",
        "benchmarks.baseline_app",
        "--host",
        ENDPOINTS.host,
        "--port",
        str(port),
        "--classifier-dir",
        str(classifier_dir),
    ]
    if with_generate:
        args.append("--generate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = processes.start_http_server("baseline", args, env, port, "/readyz", log_dir, timeout_s)
    try:
        yield server
    finally:
        server.stop()
