"""Several facade processes behind one port (FLUXSERVE_API_WORKERS > 1).

One facade is one event loop, and under a /classify storm that loop is the limit: most of a core
goes to reading and refusing requests while Triton idles (docs/benchmarks.md, "Overload": the
cores-busy column). With `workers` > 1, `python -m api.app` becomes a small supervisor that starts
that many facade processes. Each binds the same address with SO_REUSEPORT, so the kernel spreads
new connections across them (a shared accept socket would let the first process to wake take a
burst of connections), and each enforces its share of every limit (`per_worker`): the admission
bounds, Triton `generate` slots, open connections, uploads and wrong-key bursts are the
deployment's, divided among the processes, never multiplied by them. Each process measures its
own capacity, which under spread load is its share of Triton's. /classify batching stays shared:
each process coalesces its own requests into shared calls, and Triton's dynamic batcher merges
the processes' calls into one encoder batch.

The supervisor restarts a process that dies (its connections are reset; the others keep serving)
and stops all of them on SIGINT/SIGTERM, each finishing as a lone facade does. A process that dies
at start again and again (port taken, a refused secret) stops the supervisor with its exit code,
rather than looping. Metrics stay one view: the workers write Prometheus' multiprocess files in a
folder the supervisor owns, and /metrics from any of them sums all (api.metrics).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from api.settings import ApiSettings
from common.child_process import die_with_parent

log = logging.getLogger(__name__)

WORKER_ENV = "FLUXSERVE_API_WORKER"
"""Set by the supervisor in each facade process it starts: the process's index (0-based)."""
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's switch to multiprocess mode, read when it is imported (api.metrics)."""
CRASH_LOOP_DEATHS = 3
CRASH_LOOP_WINDOW_S = 10.0
"""A worker that dies this many times within this long is not restarted: the supervisor stops."""
CONFIG_ERROR_EXIT = 2
"""api.app's exit status for a refused configuration (a placeholder secret): restarting cannot help."""
STOP_WAIT_S = 15.0
"""After SIGTERM, how long a worker may take to finish (its own grace is api.app.STOP_GRACE_S)."""
POLL_S = 0.2
"""How often the supervisor looks for a dead worker (a supervisor's heartbeat, not a test's wait)."""


def worker_index() -> int | None:
    """This process's index when a supervisor started it, else None (a lone facade)."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value else None


def share(total: int, workers: int) -> int:
    """One worker's part of a limit: rounded down (the sum never exceeds the deployment's limit),
    but at least 1 (a worker that may admit nothing would refuse everything it is sent)."""
    return max(1, total // max(1, workers))


def per_worker(settings: ApiSettings) -> ApiSettings:
    """The facade settings one of `settings.workers` processes enforces (unchanged for one)."""
    n = settings.workers
    if n <= 1:
        return settings
    return settings.model_copy(
        update={
            "max_connections": share(settings.max_connections, n),
            "max_concurrent_uploads": share(settings.max_concurrent_uploads, n),
            "auth_failure_burst": share(settings.auth_failure_burst, n),
        }
    )


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT, so the other workers may bind it too; the
    server listens on it. Raises OSError when the address is taken by anything else."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def worker_env(settings: ApiSettings) -> dict[str, str]:
    """What the workers must be told beyond the environment they inherit (from which they read
    the rest of their settings, as a lone facade does): the address to bind and Triton's, which a
    caller may have set in code (runtime.stack starts Triton first)."""
    prefix = ApiSettings.model_config["env_prefix"]
    return {
        f"{prefix}HOST": settings.host,
        f"{prefix}PORT": str(settings.port),
        f"{prefix}TRITON_GRPC_URL": settings.triton_grpc_url,
    }


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    deaths: deque[float] = field(default_factory=deque)


class WorkerPool:
    """Starts `workers` facade processes, restarts those that die, stops them all on a signal."""

    def __init__(self, settings: ApiSettings, command: list[str] | None = None) -> None:
        self.settings = settings
        self.command = command or [sys.executable, "-m", "api.app"]
        self.stopping = threading.Event()
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="fluxserve-metrics-"))
        self.workers: list[_Worker] = []

    def _start(self, index: int) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            **worker_env(self.settings),
            WORKER_ENV: str(index),
            METRICS_DIR_ENV: str(self.metrics_dir),
        }
        # A process group of its own: Ctrl-C in a terminal reaches only the supervisor, which
        # sends one SIGTERM (uvicorn takes a second signal as "stop now", dropping in-flight work).
        return subprocess.Popen(self.command, env=env, process_group=0, preexec_fn=die_with_parent)

    def stop(self, *_: object) -> None:
        """Safe from a signal handler: the main loop does the stopping."""
        self.stopping.set()

    def run(self) -> int:
        """Until a signal or a crash loop; the exit status for the supervisor."""
        log.info("starting %d facade processes on %s:%d", self.settings.workers, self.settings.host, self.settings.port)
        self.workers = [_Worker(i, self._start(i)) for i in range(self.settings.workers)]
        status = 0
        try:
            while not self.stopping.wait(POLL_S):
                failed = self._replace_dead()
                if failed is not None:
                    status = failed
                    break
        finally:
            self._stop_all()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return status

    def _replace_dead(self) -> int | None:
        """Restart each worker that has exited; an exit status to stop with when one cannot be."""
        from prometheus_client import multiprocess

        for w in self.workers:
            code = w.proc.poll()
            if code is None:
                continue
            multiprocess.mark_process_dead(w.proc.pid, str(self.metrics_dir))
            now = time.monotonic()
            w.deaths.append(now)
            while w.deaths and now - w.deaths[0] > CRASH_LOOP_WINDOW_S:
                w.deaths.popleft()
            if code == CONFIG_ERROR_EXIT or len(w.deaths) >= CRASH_LOOP_DEATHS:
                log.error("facade process %d exited with %s; stopping the others", w.index, code)
                return code or 1
            log.warning("facade process %d (pid %d) exited with %s; starting another", w.index, w.proc.pid, code)
            w.proc = self._start(w.index)
        return None

    def _stop_all(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        for w in self.workers:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("facade process %d did not stop in %.0f s; killing it", w.index, STOP_WAIT_S)
                w.proc.kill()
                w.proc.wait()


def supervise(settings: ApiSettings) -> int:
    """Run `settings.workers` facade processes until SIGINT/SIGTERM (api.app.main)."""
    # Bind once here first: a taken address is reported at once, not as a crash loop.
    try:
        listening_socket(settings.host, settings.port).close()
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, e)
        return 1
    pool = WorkerPool(settings)
    signal.signal(signal.SIGTERM, pool.stop)
    signal.signal(signal.SIGINT, pool.stop)
    return pool.run()
