"""Under load and faults (issue 15), on the real Triton and the real facade.

* an oversized gRPC request (bypassing the facade) is refused by `generate` itself;
* a 100-step request whose client leaves after 1 s stops within two steps;
* a burst of abandoned requests leaves Triton idle;
* a dead stub makes /readyz say so, and the model is reloaded without an operator;
* under `make up`'s runner (runtime.stack), kill -9 of Triton is recovered, and Ctrl-C with work
  in flight stops everything, leaving no process behind.

The facade's admission answers (an oversized request refused with the limit before any model
runs, an overload burst shed with 503 + Retry-After, the early shed before the body is read) are
checked in-process in tests/unit/facade/test_http_admission.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import tritonclient.http as triton_http

from client.triton_client import TritonClient
from common.paths import BUILD_DIR
from contract.errors import InvalidInputError
from contract.specs import FLUX_TRANSFORMER, GENERATE, GenerateParams
from runtime import processes
from tests.conftest import PROJECT_ROOT, Facade, free_port, require_models, wait_for

# This machine is shared and often far past saturation: generous start-up bounds (not timings).
STARTUP_TIMEOUT_S = 600.0

pytestmark = pytest.mark.integration

PROMPT = "a red fox in snow"
LONG = {"prompt": PROMPT, "width": 256, "height": 256, "steps": 100, "seed": 1}


def start_facade(grpc_url: str, env: dict[str, str], ready_path: str = "/healthz") -> Facade:
    return processes.start_facade(grpc_url, env, ready_path, timeout_s=STARTUP_TIMEOUT_S)


class Stats:
    """Triton's per-model statistics: executions finished and inferences run."""

    def __init__(self, http_url: str) -> None:
        self.client = triton_http.InferenceServerClient(http_url)

    def finished(self, model: str) -> int:
        """Requests that left the model (succeeded or failed, cancelled included)."""
        total = 0
        for s in self.client.get_inference_statistics(model)["model_stats"]:
            total += int(s["inference_stats"]["success"]["count"]) + int(s["inference_stats"]["fail"]["count"])
        return total

    def inferences(self, model: str) -> int:
        return sum(int(s["inference_count"]) for s in self.client.get_inference_statistics(model)["model_stats"])


@pytest.fixture(scope="module")
def server(triton) -> object:
    """The session's Triton (tests/conftest.py): every check here counts Triton's statistics from
    before to after, and the tests run one at a time."""
    require_models("classify", GENERATE.name)
    return triton


@pytest.fixture(scope="module")
def stats(server) -> Stats:
    return Stats(server.http_url)


@pytest.fixture(scope="module")
def facade(server, stats: Stats) -> Iterator[Facade]:
    finished = stats.finished(GENERATE.name)
    f = start_facade(server.grpc_url, {"FLUXSERVE_API_READY_PROBE_INTERVAL_S": "2"}, ready_path="/readyz")
    # Its /readyz proved `generate` with one probe image. Triton records a request's statistics just
    # after its response, so on a busy machine a test's snapshot could miss the probe and count it
    # as the test's own: wait for its record first.
    wait_for(lambda: stats.finished(GENERATE.name) > finished, 30, "the readiness probe in Triton's statistics")
    yield f
    f.stop()


def generate_idle(stats: Stats, before: int, expected: int) -> Callable[[], bool]:
    return lambda: stats.finished(GENERATE.name) - before >= expected


def test_oversized_grpc_request_is_refused_by_generate_itself(server, stats: Stats) -> None:
    """A gRPC client bypassing the facade (and its guard) cannot get a stub OOM-killed either:
    `generate` refuses a 2048x2048 image (about 8.7 GB of attention on the small model, over its
    instance's part of the host's memory) before it calls the transformer."""
    before = stats.inferences(FLUX_TRANSFORMER)
    with TritonClient(server.grpc_url, timeout_s=120) as triton:
        with pytest.raises(InvalidInputError, match="transformer memory"):
            triton.generate(GenerateParams(prompt=PROMPT, seed=1, width=2048, height=2048, steps=1))
        assert triton.generate(GenerateParams(prompt=PROMPT, seed=1, width=64, height=64, steps=1)).image.size > 0
    assert stats.inferences(FLUX_TRANSFORMER) == before + 1


def _send_and_hold(url: str, path: str, body: dict) -> socket.socket:
    """POST over a raw connection left open: closing it is a client going away mid-request."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def test_cancelled_request_stops_within_two_steps(facade: Facade, stats: Stats) -> None:
    """The client leaves a 100-step generation once it runs (and after at least 1 s): Triton
    stops it within two steps."""
    finished = stats.finished(GENERATE.name)
    steps_before = stats.inferences(FLUX_TRANSFORMER)
    sock = _send_and_hold(facade.url, "/generate", LONG)
    sent = time.monotonic()
    wait_for(
        lambda: stats.inferences(FLUX_TRANSFORMER) > steps_before and time.monotonic() - sent >= 1.0,
        120,
        "the generation to be running in Triton",
    )
    sock.close()
    steps_at_cancel = stats.inferences(FLUX_TRANSFORMER)
    wait_for(generate_idle(stats, finished, 1), 60, "the cancelled generation to leave Triton")
    steps_after = stats.inferences(FLUX_TRANSFORMER)
    print(f"steps before cancel: {steps_at_cancel - steps_before}, after: {steps_after - steps_at_cancel}")
    assert steps_after - steps_at_cancel <= 2
    with facade.client(timeout_s=300) as http:  # its instance is free again
        assert http.post("/generate", json={**LONG, "steps": 2, "width": 64, "height": 64}).status_code == 200


def test_burst_of_abandoned_requests_leaves_triton_idle(facade: Facade, stats: Stats) -> None:
    finished = stats.finished(GENERATE.name)
    steps_before = stats.inferences(FLUX_TRANSFORMER)

    def abandon(i: int) -> int:
        try:
            with facade.client(timeout_s=1.0) as http:
                return http.post("/generate", json={**LONG, "seed": i}).status_code
        except httpx.ReadTimeout:
            return 0  # admitted, then abandoned

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(abandon, range(6)))
    abandoned = codes.count(0)
    assert abandoned >= 1 and set(codes) <= {0, 503}, codes
    wait_for(generate_idle(stats, finished, abandoned), 60, f"{abandoned} abandoned generations to leave Triton")
    steps = stats.inferences(FLUX_TRANSFORMER) - steps_before
    assert steps < abandoned * LONG["steps"] / 2, f"{steps} transformer steps ran for {abandoned} abandoned requests"


def _stub_pids(model: str) -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"]
        and "triton_python_backend_stub" in p.info["cmdline"][0]
        and any(f"/{model}/" in a or a.endswith(f"/{model}") for a in p.info["cmdline"])
    ]


def test_dead_stub_is_reported_and_recovered(server, facade: Facade) -> None:
    """Kill -9 the transformer's stub (as the OOM killer did): not ready, then reloaded, serving.
    On the session's Triton: the test ends only once it serves again."""
    pids = [p for p in _stub_pids(FLUX_TRANSFORMER) if psutil.Process(p).ppid() == server.process.pid]
    assert pids, "no flux_transformer stub found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    with facade.client(timeout_s=300) as http:
        r = http.post("/generate", json={"prompt": PROMPT, "width": 64, "height": 64, "steps": 2})
        assert r.status_code == 503 and "retry-after" in r.headers, r.text
        assert http.get("/readyz").status_code == 503
        wait_for(lambda: http.get("/readyz").status_code == 200, 180, "/readyz 200 again after the reload")
        print(f"dead stub: ready again {time.monotonic() - killed:.1f}s after kill -9")
        ok = http.post("/generate", json={"prompt": PROMPT, "width": 64, "height": 64, "steps": 2})
        assert ok.status_code == 200, ok.text


# ----------------------------------------------------------------------------- make up's runner


@pytest.fixture
def stack(tmp_path) -> Iterator[tuple[subprocess.Popen, str, dict[str, int]]]:
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port(), "api": free_port()}
    env = {
        **os.environ,
        "FLUXSERVE_TRITON_HTTP_PORT": str(ports["http"]),
        "FLUXSERVE_TRITON_GRPC_PORT": str(ports["grpc"]),
        "FLUXSERVE_TRITON_METRICS_PORT": str(ports["metrics"]),
        "FLUXSERVE_API_PORT": str(ports["api"]),
        "FLUXSERVE_TRITON_LOG_FILE": str(tmp_path / "triton.log"),
        "FLUXSERVE_TRITON_STARTUP_TIMEOUT_S": str(STARTUP_TIMEOUT_S),
        "FLUXSERVE_JOBS_JOBS_DIR": str(tmp_path / "jobs"),
    }
    log_path = BUILD_DIR / "logs" / f"test-stack-{ports['api']}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.stack"], cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{ports['api']}"
    try:
        wait_for(
            lambda: _status(url + "/readyz") == 200,
            STARTUP_TIMEOUT_S,
            f"the stack to be ready (log: {log_path})",
            every_s=1,
        )
        yield proc, url, ports
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def _triton_process(stack_pid: int) -> psutil.Process:
    return next(p for p in psutil.Process(stack_pid).children(recursive=True) if p.name() == "tritonserver")


def test_kill_triton_under_the_runner_recovers_then_ctrl_c_stops_all(stack) -> None:
    proc, url, ports = stack
    triton = _triton_process(proc.pid)
    triton.kill()
    killed = time.monotonic()
    wait_for(lambda: _status(url + "/readyz") == 503, 30, "/readyz to report Triton gone")
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/classify", json={"text": "hello"})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
    wait_for(
        lambda: _status(url + "/readyz") == 200, STARTUP_TIMEOUT_S, "/readyz 200 after Triton's restart", every_s=1
    )
    print(f"kill -9 tritonserver: ready again after {time.monotonic() - killed:.1f}s")
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/classify", json={"text": "hello"}).status_code == 200
    assert _triton_process(proc.pid).pid != triton.pid

    # Ctrl-C with a long generation in flight: everything stops, nothing is left behind.
    family = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    stats = Stats(f"127.0.0.1:{ports['http']}")
    steps = stats.inferences(FLUX_TRANSFORMER)
    in_flight = ThreadPoolExecutor(1).submit(lambda: _status_post(url + "/generate", LONG))
    wait_for(lambda: stats.inferences(FLUX_TRANSFORMER) > steps, 120, "the generation to be running in Triton")
    proc.send_signal(signal.SIGINT)
    stopping = time.monotonic()
    proc.wait(60)
    wait_for(
        lambda: not [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE],
        60,
        "every process of the stack to exit",
    )
    print(f"Ctrl-C with work in flight: all stopped in {time.monotonic() - stopping:.1f}s")
    assert in_flight.result(60) in (0, 499, 503, 504)


def test_sigterm_stops_the_whole_stack(stack) -> None:
    """`docker stop` / systemd / `kill` send SIGTERM: Triton and the worker must go with the runner."""
    proc, _, _ = stack
    family = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    assert len(family) >= 3  # the runner, tritonserver (and its stubs), the training worker
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    wait_for(
        lambda: not [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE],
        60,
        "every process of the stack to exit after SIGTERM",
    )


def _status_post(url: str, body: dict) -> int:
    try:
        return httpx.post(url, json=body, timeout=120).status_code
    except httpx.HTTPError:
        return 0
