"""The one way to start fluxserve's server processes on free loopback ports and wait until they are
ready: Triton (through runtime.launcher) and HTTP apps (the facade, or any uvicorn app module).
Tests, benchmarks and tools use these instead of starting processes their own way.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from common.paths import BUILD_DIR, PROJECT_ROOT
from contract.specs import ENDPOINTS
from runtime.launcher import TritonServer, TritonSettings

log = logging.getLogger(__name__)

LOG_DIR = BUILD_DIR / "logs"


class ServerError(RuntimeError):
    """A server did not start or did not become ready; carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((ENDPOINTS.host, 0))
        return s.getsockname()[1]


def start_triton(
    repo: Path, models: Iterable[str] = ("*",), log_dir: Path = LOG_DIR, tag: str = "triton", **overrides: object
) -> TritonServer:
    """Triton serving `repo` on three free loopback ports, ready when this returns."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = TritonSettings(
        model_repository=repo,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        models=tuple(models),
        log_file=log_dir / f"{tag}-{grpc}.log",
        **overrides,
    )
    return TritonServer(settings).start()


@contextmanager
def triton(
    repo: Path, models: Iterable[str] = ("*",), log_dir: Path = LOG_DIR, tag: str = "triton"
) -> Iterator[TritonServer]:
    server = start_triton(repo, models, log_dir, tag)
    try:
        yield server
    finally:
        server.stop()


class HttpServer:
    """A Python HTTP app in a subprocess, reachable at `url`."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.name, self.proc, self.url, self.log_path = name, proc, url, log_path

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def client(self, timeout_s: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s)

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
            time.sleep(0.2)
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


def start_http_server(
    name: str,
    args: list[str],
    env: Mapping[str, str],
    port: int,
    ready_path: str = "/readyz",
    log_dir: Path = LOG_DIR,
    timeout_s: float = 60.0,
) -> HttpServer:
    """Run `python <args>` (an app listening on `port`) and return once `ready_path` answers 200."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=PROJECT_ROOT, env=dict(env), stdout=fh, stderr=subprocess.STDOUT
        )
    server = HttpServer(name, proc, f"http://{ENDPOINTS.host}:{port}", log_path)
    server.wait_ready(ready_path, timeout_s)
    return server


def start_facade(
    triton_grpc_url: str,
    extra_env: Mapping[str, str] | None = None,
    ready_path: str = "/readyz",
    required_models: Iterable[str] | None = None,
    log_dir: Path = LOG_DIR,
    timeout_s: float = 60.0,
) -> HttpServer:
    """The real facade (`python -m api.app`) on a free port, configured by its FLUXSERVE_API_ environment."""
    port = free_port()
    env = {
        **os.environ,
        **(extra_env or {}),
        "FLUXSERVE_API_HOST": ENDPOINTS.host,
        "FLUXSERVE_API_PORT": str(port),
        "FLUXSERVE_API_TRITON_GRPC_URL": triton_grpc_url,
    }
    if required_models is not None:
        env["FLUXSERVE_API_REQUIRED_MODELS"] = json.dumps(list(required_models))
    return start_http_server("facade", ["-m", "api.app"], env, port, ready_path, log_dir, timeout_s)


@contextmanager
def facade(
    triton_grpc_url: str,
    required_models: Iterable[str] | None = None,
    log_dir: Path = LOG_DIR,
    timeout_s: float = 60.0,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[HttpServer]:
    server = start_facade(triton_grpc_url, extra_env, "/readyz", required_models, log_dir, timeout_s)
    try:
        yield server
    finally:
        server.stop()
