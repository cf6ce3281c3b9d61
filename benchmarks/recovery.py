"""`fluxserve-bench recovery`: how long `make up`'s stack takes to come back from what kills it.

Runs `python -m runtime.stack` (what `make up` runs) on free loopback ports and times, from the
moment of the kill to `/readyz` answering 200 again (no operator action in between):
* `kill -9` of tritonserver (the supervisor restarts it with the committed model versions);
* `kill -9` of the `flux_transformer` stub, as the kernel's OOM killer would (the facade reloads
  the model through Triton's model-control API);
* `kill -9` of the training worker: the time until the supervisor has a new worker running.
The cold start of the whole stack is reported alongside, since a Triton restart is mostly that.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.servers import LOG_DIR
from common.paths import BUILD_DIR, PROJECT_ROOT
from contract.specs import FLUX_TRANSFORMER
from runtime.processes import free_port

log = logging.getLogger(__name__)

RESULT_FILE = Path(__file__).resolve().parent / "results" / "recovery.json"


@dataclass(frozen=True)
class RecoverySettings:
    repeats: int = 2
    """kill -9 of tritonserver is repeated this many times (the other faults once)."""
    timeout_s: float = 600.0
    out: Path = RESULT_FILE
    log_dir: Path = LOG_DIR


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `condition()` holds (polled every 0.25 s); RuntimeError at the timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"not within {timeout_s:.0f}s: {what}")
        time.sleep(0.25)
    return time.monotonic() - started


@contextmanager
def _stack(s: RecoverySettings) -> Iterator[tuple[psutil.Process, str, float]]:
    ports = {k: free_port() for k in ("HTTP", "GRPC", "METRICS")}
    api_port = free_port()
    s.log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **{f"FLUXSERVE_TRITON_{k}_PORT": str(v) for k, v in ports.items()},
        "FLUXSERVE_API_PORT": str(api_port),
        "FLUXSERVE_TRITON_LOG_FILE": str(s.log_dir / "recovery-triton.log"),
        "FLUXSERVE_JOBS_JOBS_DIR": str(BUILD_DIR / "bench-recovery-jobs"),
    }
    url = f"http://127.0.0.1:{api_port}"
    started = time.monotonic()
    with (s.log_dir / "recovery-stack.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.stack"], cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        cold = _wait(lambda: _status(url + "/readyz") == 200, s.timeout_s, "the stack to be ready")
        yield psutil.Process(proc.pid), url, cold
    finally:
        proc.send_signal(2)  # Ctrl-C, as an operator would
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
        log.info("stack stopped (%.0fs in all)", time.monotonic() - started)


def _children(stack: psutil.Process, match: Callable[[psutil.Process], bool]) -> list[psutil.Process]:
    out = []
    for p in stack.children(recursive=True):
        try:
            if match(p):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _is_triton(p: psutil.Process) -> bool:
    return p.name() == "tritonserver"


def _is_transformer_stub(p: psutil.Process) -> bool:
    cmd = p.cmdline()
    return bool(cmd) and "triton_python_backend_stub" in cmd[0] and any(f"/{FLUX_TRANSFORMER}/" in a for a in cmd)


def _is_worker(p: psutil.Process) -> bool:
    return "training.worker" in " ".join(p.cmdline())


def _kill_until_ready(stack: psutil.Process, url: str, match: Callable[[psutil.Process], bool], s: RecoverySettings):
    victims = _children(stack, match)
    if not victims:
        raise RuntimeError("nothing to kill")
    for v in victims:
        v.kill()
    killed = time.monotonic()
    # The facade notices (a failed probe or request) before it can report ready again.
    _wait(lambda: _status(url + "/readyz") != 200, 60, "/readyz to notice")
    noticed = time.monotonic() - killed
    _wait(lambda: _status(url + "/readyz") == 200, s.timeout_s, "/readyz 200 again")
    return {"noticed_s": round(noticed, 1), "ready_again_s": round(time.monotonic() - killed, 1)}


def recovery(s: RecoverySettings | None = None) -> dict[str, Any]:
    s = s or RecoverySettings()
    result: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}}
    with _stack(s) as (stack, url, cold_s):
        result["cold_start_s"] = round(cold_s, 1)
        log.info("stack ready after %.1fs", cold_s)
        result["kill_tritonserver"] = []
        for _ in range(s.repeats):
            result["kill_tritonserver"].append(_kill_until_ready(stack, url, _is_triton, s))
            log.info("kill -9 tritonserver: %s", result["kill_tritonserver"][-1])
        result["kill_transformer_stub"] = _kill_until_ready(stack, url, _is_transformer_stub, s)
        log.info("kill -9 flux_transformer stub: %s", result["kill_transformer_stub"])
        old = {p.pid for p in _children(stack, _is_worker)}
        for p in _children(stack, _is_worker):
            p.kill()
        killed = time.monotonic()
        _wait(lambda: any(p.pid not in old for p in _children(stack, _is_worker)), 120, "a new training worker")
        result["kill_worker_restarted_s"] = round(time.monotonic() - killed, 1)
        log.info("kill -9 training worker: restarted after %.1fs", result["kill_worker_restarted_s"])
    result["load_average"] = [round(x, 1) for x in os.getloadavg()]
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.out.write_text(json.dumps(result, indent=2))
    s.out.with_suffix(".md").write_text(render_markdown(result))
    return result


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| fault (kill -9) | facade noticed after s | ready again after s |",
        "|---|---|---|",
    ]
    for i, r in enumerate(result["kill_tritonserver"], 1):
        lines.append(f"| tritonserver (#{i}) | {r['noticed_s']} | {r['ready_again_s']} |")
    r = result["kill_transformer_stub"]
    lines.append(f"| flux_transformer stub (as the OOM killer) | {r['noticed_s']} | {r['ready_again_s']} |")
    lines.append(f"| training worker | - | {result['kill_worker_restarted_s']} (new worker running) |")
    lines.append(f"| (cold start of the whole stack, for scale) | - | {result['cold_start_s']} |")
    return "\n".join(lines) + "\n"
