"""`fluxserve-bench goodput`: what clients that retry at once get served (issue 24).

Load balancers, wrk and busy client fleets run a closed loop: every answer, a 503 included, is
followed at once by the next request, and Retry-After is ignored. For /classify and /generate,
on the facade with its production settings (`make up`'s), this drives N connections at 1x, 4x,
16x and 64x the concurrency that saturates the endpoint (plus 2x for /classify: the 32
connections the issue names) and reports, per point:

* goodput: answered-200 requests per second, never the total rate, and its ratio to goodput at
  1x (capacity); refused (503) and failed counts;
* the latency of the *served* requests (p50/p99), and how long refusals took to answer.

Two drivers, same points: `wrk` (C, the outside check; its latency percentiles mix served and
refused requests, so only its counts are used) and this process's lean keep-alive client
(benchmarks.fast_http; the served-latency figures). Each point runs `duration_s`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

from benchmarks.fast_http import FastHttpPool
from benchmarks.servers import CLASSIFY_STACK, GENERATE_STACK, LOG_DIR, MODEL_REPOSITORY, facade, triton
from benchmarks.workload import GENERATE_PROMPTS, chat_texts
from common.collector import collector_tuned
from contract.specs import CLASSIFY, GENERATE

log = logging.getLogger(__name__)

RESULT_FILE = Path(__file__).resolve().parent / "results" / "goodput.json"


@dataclass(frozen=True)
class GoodputSettings:
    duration_s: float = 10.0
    endpoints: tuple[str, ...] = (CLASSIFY.name, GENERATE.name)
    saturating: dict[str, int] = field(default_factory=lambda: {CLASSIFY.name: 16, GENERATE.name: 4})
    """Connections at which each endpoint's goodput stops growing here (2 cores): the 1x point."""
    multipliers: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {CLASSIFY.name: (1, 2, 4, 16, 64), GENERATE.name: (1, 4, 16, 64)}
    )
    drivers: tuple[str, ...] = ("wrk", "python")
    generate_side: int = 128
    generate_steps: int = 4
    client_timeout_s: float = 60.0
    facade_env: dict[str, str] = field(default_factory=dict)
    """Facade settings changed for an experiment (empty: `make up`'s; the results say which)."""
    model_repository: Path = MODEL_REPOSITORY
    out: Path = RESULT_FILE
    log_dir: Path = LOG_DIR


def request_body(model: str, i: int, s: GoodputSettings) -> tuple[str, dict[str, Any]]:
    if model == GENERATE.name:
        side = s.generate_side
        prompt = GENERATE_PROMPTS[i % len(GENERATE_PROMPTS)]
        return "/generate", {"prompt": prompt, "width": side, "height": side, "steps": s.generate_steps, "seed": i}
    texts = chat_texts()
    return "/classify", {"text": texts[i % len(texts)]}


# ----------------------------------------------------------------------------- wrk


def wrk_script(model: str, s: GoodputSettings, bodies: int = 200) -> str:
    """POSTs cycling through `bodies` request bodies of the endpoint."""
    path, _ = request_body(model, 0, s)
    encoded = ",\n".join(json.dumps(json.dumps(request_body(model, i, s)[1])) for i in range(bodies))
    return (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local bodies = {{\n{encoded}\n}}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i % #bodies + 1\n"
        f'  return wrk.format(nil, "{path}", nil, bodies[i])\n'
        "end\n"
    )


def parse_wrk_counts(output: str) -> dict[str, Any]:
    """Responses, non-2xx and socket errors from wrk's summary; answered-200 per second."""
    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", output)
    if not done:
        raise ValueError(f"no request count in wrk's output:\n{output}")
    seconds = float(done.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[done.group(3)]
    responses = int(done.group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    refused = int(non_2xx.group(1)) if non_2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "responses": responses,
        "non_2xx": refused,
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
        "seconds": round(seconds, 2),
        "ok_rps": round((responses - refused) / seconds, 2) if seconds else 0.0,
    }


def run_wrk(url: str, script: Path, connections: int, s: GoodputSettings) -> dict[str, Any]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{int(s.duration_s)}s", "--timeout", f"{int(s.client_timeout_s)}s"]
    out = subprocess.run(
        [*cmd, "-s", str(script), url], capture_output=True, text=True, check=True, timeout=s.duration_s + 120
    )
    return parse_wrk_counts(out.stdout)


# ----------------------------------------------------------------------------- the Python driver


async def storm(model: str, url: str, connections: int, s: GoodputSettings) -> dict[str, Any]:
    """`connections` clients in a closed loop, each sending its next request as soon as an answer
    (any answer) arrives, for `duration_s`; served and refused latencies kept apart."""
    pool = FastHttpPool.for_url(url, max_connections=connections)
    raw = [pool.post_bytes(*_path_and_bytes(model, i, s)) for i in range(200)]
    served: list[float] = []
    refused: list[float] = []
    failed: dict[str, int] = {}
    without_retry_after = 0
    deadline = time.perf_counter() + s.duration_s

    async def client(k: int) -> None:
        nonlocal without_retry_after
        i = k
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                r = await pool.request(raw[i % len(raw)], s.client_timeout_s)
            except (OSError, TimeoutError) as e:
                failed[type(e).__name__] = failed.get(type(e).__name__, 0) + 1
                continue
            finally:
                i += connections
            elapsed = time.perf_counter() - started
            if r.status == 200:
                served.append(elapsed)
            elif r.status == 503:
                refused.append(elapsed)
                without_retry_after += "retry-after" not in r.headers
            else:
                failed[f"http_{r.status}"] = failed.get(f"http_{r.status}", 0) + 1

    started = time.perf_counter()
    try:
        with collector_tuned():  # the driver's own pauses would count as latency (benchmarks.load)
            await asyncio.gather(*(client(k) for k in range(connections)))
    finally:
        await pool.close()
    wall = time.perf_counter() - started
    return {
        "ok_rps": round(len(served) / wall, 2),
        "served": len(served),
        "refused": len(refused),
        "failed": sum(failed.values()),
        "failed_by_kind": failed,
        "refused_without_retry_after": without_retry_after,
        "served_p50_ms": _pct(served, 50),
        "served_p99_ms": _pct(served, 99),
        "refusal_p50_ms": _pct(refused, 50),
        "refusal_max_ms": _pct(refused, 100),
        "seconds": round(wall, 2),
    }


def _path_and_bytes(model: str, i: int, s: GoodputSettings) -> tuple[str, bytes]:
    path, body = request_body(model, i, s)
    return path, json.dumps(body).encode()


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


# ----------------------------------------------------------------------------- the run


def _endpoint(model: str, url: str, s: GoodputSettings) -> dict[str, Any]:
    base = s.saturating[model]
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / f"{model}.lua"
        script.write_text(wrk_script(model, s))
        uvloop.run(storm(model, url, 2, GoodputSettings(duration_s=2.0)))  # warm-up: first inferences are slow
        for m in s.multipliers[model]:
            point: dict[str, Any] = {"multiplier": m, "connections": base * m}
            if "wrk" in s.drivers:
                point["wrk"] = run_wrk(url, script, base * m, s)
            if "python" in s.drivers:
                point["python"] = uvloop.run(storm(model, url, base * m, s))
            log.info("%s at %d connections: %s", model, base * m, point)
            points.append(point)
    for driver in s.drivers:
        capacity = points[0][driver]["ok_rps"]
        for p in points:
            p[driver]["vs_capacity"] = round(p[driver]["ok_rps"] / capacity, 3) if capacity else None
    return {"model": model, "saturating_connections": base, "points": points}


def goodput(s: GoodputSettings | None = None) -> dict[str, Any]:
    s = s or GoodputSettings()
    if "wrk" in s.drivers and shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    result: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
        "facade": f"changed: {s.facade_env}" if s.facade_env else "production settings (make up's defaults)",
        "endpoints": [],
    }
    stack = (*CLASSIFY_STACK, *(GENERATE_STACK if GENERATE.name in s.endpoints else ()))
    with triton(s.model_repository, stack, s.log_dir, tag="goodput") as server:
        with facade(server.grpc_url, list(s.endpoints), s.log_dir, extra_env=s.facade_env) as api:
            for model in s.endpoints:
                result["endpoints"].append(_endpoint(model, api.url, s))
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.out.write_text(json.dumps(result, indent=2))
    s.out.with_suffix(".md").write_text(render_markdown(result))
    return result


def render_markdown(result: dict[str, Any]) -> str:
    """docs/benchmarks.md's goodput table: one row per endpoint and connection count."""
    lines = [
        f"Closed loop, immediate retries, Retry-After ignored; the facade: {result['facade']}; "
        f"{result['settings']['duration_s']:g} s per point (`fluxserve-bench goodput`).",
        "",
        "| endpoint | connections (x saturating) | wrk: answered 200/s (vs 1x) | wrk: refused 503 | wrk: socket errors "
        "| python: answered 200/s (vs 1x) | served p50 / p99 ms | refusal p50 / max ms | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ep in result["endpoints"]:
        for p in ep["points"]:
            w, py = p.get("wrk", {}), p.get("python", {})
            lines.append(
                f"| /{ep['model']} | {p['connections']} ({p['multiplier']}x) | "
                f"{w.get('ok_rps')} ({w.get('vs_capacity')}) | {w.get('non_2xx')} | {w.get('socket_errors')} | "
                f"{py.get('ok_rps')} ({py.get('vs_capacity')}) | {py.get('served_p50_ms')} / {py.get('served_p99_ms')} | "
                f"{py.get('refusal_p50_ms')} / {py.get('refusal_max_ms')} | {py.get('failed')} |"
            )
    return "\n".join(lines) + "\n"
