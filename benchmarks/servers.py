"""Start what a benchmark measures, on free loopback ports: Triton, the facade, the baseline.

Triton runs through runtime.launcher (the same code `make up` uses). The facade and the baseline
run as their own processes, as in production, and are awaited on their readiness endpoints.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from client.contract import CLASSIFIER_ONNX, CLASSIFY, FLUX_COMPONENTS, GENERATE, ENDPOINTS
from runtime.launcher import TritonServer, TritonSettings

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
LOG_DIR = PROJECT_ROOT / "build" / "logs" / "bench"
CLASSIFY_STACK: tuple[str, ...] = (CLASSIFY.name, CLASSIFIER_ONNX.name)
GENERATE_STACK: tuple[str, ...] = (GENERATE.name, *FLUX_COMPONENTS)


class ServerError(RuntimeError):
    """A server did not start or did not become ready; carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((ENDPOINTS.host, 0))
        return s.getsockname()[1]


def is_built(repo: Path, model: str) -> bool:
    """A model is servable when export wrote its config and at least one version."""
    model_dir = repo / model
    return (model_dir / "config.pbtxt").exists() and any(p.is_dir() and p.name.isdigit() for p in model_dir.iterdir())


def stack_built(repo: Path, stack: Iterable[str]) -> bool:
    return all(is_built(repo, m) for m in stack)


def start_triton(repo: Path, models: Iterable[str], log_dir: Path = LOG_DIR, tag: str = "bench") -> TritonServer:
    http, grpc, metrics = free_port(), free_port(), free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = TritonSettings(
        model_repository=repo, http_port=http, grpc_port=grpc, metrics_port=metrics, models=tuple(models),
        log_file=log_dir / f"triton-{tag}-{grpc}.log",
    )
    return TritonServer(settings).start()


@contextmanager
def triton(repo: Path, models: Iterable[str], log_dir: Path = LOG_DIR, tag: str = "bench") -> Iterator[TritonServer]:
    server = start_triton(repo, models, log_dir, tag)
    try:
        yield server
    finally:
        server.stop()


class HttpServer:
    """A uvicorn app in a subprocess, reachable at `url`."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.name, self.proc, self.url, self.log_path = name, proc, url, log_path

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def wait_ready(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=2.0).status_code == 200:
                    log.info("%s ready at %s", self.name, self.url)
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout_s)
                self.proc.kill()
                self.proc.wait()


@contextmanager
def _serve(name: str, args: list[str], env: dict[str, str], log_dir: Path, port: int,
           timeout_s: float) -> Iterator[HttpServer]:
    """Run `python <args>` until the block ends, yielding once it answers /readyz."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    with log_path.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, *args], cwd=PROJECT_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    server = HttpServer(name, proc, f"http://{ENDPOINTS.host}:{port}", log_path)
    try:
        server.wait_ready("/readyz", timeout_s)
        yield server
    finally:
        server.stop()


@contextmanager
def facade(triton_grpc_url: str, required_models: Iterable[str], log_dir: Path = LOG_DIR,
           timeout_s: float = 60.0, extra_env: dict[str, str] | None = None) -> Iterator[HttpServer]:
    """The real facade (`python -m api.app`), configured by its FLUXSERVE_API_ environment."""
    port = free_port()
    env = {
        **os.environ,
        **(extra_env or {}),
        "FLUXSERVE_API_HOST": ENDPOINTS.host,
        "FLUXSERVE_API_PORT": str(port),
        "FLUXSERVE_API_TRITON_GRPC_URL": triton_grpc_url,
        "FLUXSERVE_API_REQUIRED_MODELS": json.dumps(list(required_models)),
    }
    with _serve("facade", ["-m", "api.app"], env, log_dir, port, timeout_s) as server:
        yield server


@contextmanager
def baseline(classifier_dir: Path, with_generate: bool, log_dir: Path = LOG_DIR,
             timeout_s: float = 300.0) -> Iterator[HttpServer]:
    """The prototype-style app (benchmarks/baseline_app.py): models in-process, one request at a time."""
    port = free_port()
    args = ["-m", "benchmarks.baseline_app", "--host", ENDPOINTS.host, "--port", str(port),
            "--classifier-dir", str(classifier_dir)]
    if with_generate:
        args.append("--generate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with _serve("baseline", args, env, log_dir, port, timeout_s) as server:
        yield server

