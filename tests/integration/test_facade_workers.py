"""Several facade processes behind one port (FLUXSERVE_API_WORKERS, api/worker_pool.py), for real.

What only real processes show: the kernel spreads connections across the processes (SO_REUSEPORT),
/metrics sums what all of them served whichever answers, a killed process is replaced while the
other keeps serving, a stop signal stops them all, and a process that cannot start stops the
supervisor with its reason instead of a restart loop. One supervisor for the module (a start
costs a few seconds per process on 2 cores). No Triton: every check is on routes that need none
(/healthz, /metrics), so the file starts only its own processes, on free ports, and runs in the
background lane (tests/run_suite.py: SELF_CONTAINED); its waits are generous for that lane's
lowest priority.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpx
import psutil
import pytest

from api.worker_pool import WORKER_ENV
from common.paths import PROJECT_ROOT
from runtime import processes
from tests.conftest import TEST_API_KEY, wait_for

pytestmark = pytest.mark.integration

WORKERS = 2
CONNECTIONS = 16
"""Each its own TCP connection: with 2 processes, all 16 on one is a 1-in-32,768 chance."""
START_S = 300.0
"""Waits for processes to start, at nice 19 beside the foreground lane."""
NO_TRITON = "127.0.0.1:9"
"""Nothing listens there: the facade starts and answers /healthz and /metrics without Triton."""


def workers_of(supervisor: psutil.Process) -> list[psutil.Process]:
    return [p for p in supervisor.children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def healthz_total(url: str) -> float:
    """/healthz requests the facade counted (all processes' counts, as /metrics merges them)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fluxserve_http_requests_total{") and 'route="/healthz"' in line
    )


@pytest.fixture(scope="module")
def pool() -> Iterator[processes.HttpServer]:
    env = {"FLUXSERVE_API_KEYS": f"tests:{TEST_API_KEY}", "FLUXSERVE_API_WORKERS": str(WORKERS)}
    server = processes.start_facade(NO_TRITON, env, "/healthz", timeout_s=START_S)
    supervisor = psutil.Process(server.proc.pid)
    wait_for(lambda: len(workers_of(supervisor)) == WORKERS, START_S, f"{WORKERS} facade processes")
    yield server
    server.stop()


def test_connections_spread_over_the_processes_and_metrics_sum_them(pool: processes.HttpServer) -> None:
    supervisor = psutil.Process(pool.proc.pid)
    port = int(pool.url.rsplit(":", 1)[1])
    before = healthz_total(pool.url)
    clients = [httpx.Client(base_url=pool.url, timeout=60) for _ in range(CONNECTIONS)]
    try:
        answers = [c.get("/healthz") for c in clients]
        assert [r.status_code for r in answers] == [200] * CONNECTIONS, [
            r.text for r in answers if r.status_code != 200
        ]
        # The connections are still open (keep-alive): each process holds some of them.
        holders = {
            w.pid
            for w in workers_of(supervisor)
            for c in w.net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
        }
        assert len(holders) == WORKERS, holders
    finally:
        for c in clients:
            c.close()
    # Each process counted its own requests; any of them reports the sum.
    assert healthz_total(pool.url) == before + CONNECTIONS


def test_a_killed_process_is_replaced_while_the_other_serves(pool: processes.HttpServer) -> None:
    supervisor = psutil.Process(pool.proc.pid)
    victim = workers_of(supervisor)[0]
    before = healthz_total(pool.url)
    victim.kill()
    victim.wait(10)
    # The survivor answers at once, on new connections (the victim's were reset with it).
    for _ in range(4):
        r = httpx.get(f"{pool.url}/healthz", timeout=60)
        assert r.status_code == 200, r.text
    replaced = wait_for(
        lambda: len(ws := workers_of(supervisor)) == WORKERS and victim.pid not in {w.pid for w in ws},
        START_S,
        "a new process in place of the killed one",
    )
    assert replaced
    # The killed process's counts are kept (Prometheus' multiprocess files outlive it).
    assert healthz_total(pool.url) >= before + 4


def test_sigterm_stops_every_process(pool: processes.HttpServer) -> None:
    """Last of the pool's tests: it stops the pool."""
    supervisor = psutil.Process(pool.proc.pid)
    workers = wait_for(lambda: len(ws := workers_of(supervisor)) == WORKERS and ws, START_S, "both processes")
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(60) == 0
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, alive


def _supervisor(extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FLUXSERVE_API_KEYS": f"tests:{TEST_API_KEY}",
        "FLUXSERVE_API_WORKERS": str(WORKERS),
        **extra_env,
    }
    env.pop(WORKER_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "api.app"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=START_S
    )


def test_a_taken_port_stops_the_supervisor_with_the_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = _supervisor({"FLUXSERVE_API_PORT": str(taken.getsockname()[1])})
    assert done.returncode == 1 and "cannot listen on" in done.stderr, done.stderr[-2000:]


def test_a_refused_secret_stops_the_supervisor_without_restarts() -> None:
    done = _supervisor({"FLUXSERVE_API_PORT": str(processes.free_port()), "FLUXSERVE_TRITON_CONTROL_KEY": "changeme"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "not starting" in done.stderr and "starting another" not in done.stderr, done.stderr[-2000:]
