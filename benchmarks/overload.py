"""`fluxserve-bench overload`: open-loop load beyond capacity through the facade (issue 15).

For /generate and /classify: measure the capacity (closed loop, on a facade with its wait bound
off: the production bound would shed part of the closed loop and understate it) and a lone
request (production settings, as everything after), then offer
Poisson load at 2x, 5x and 10x that capacity for `duration_s` each. Every request ends as served
(200), rejected (503 with Retry-After: shed by admission control) or failed (any other status,
a transport error or the client's own timeout). Reported per load point: those counts, p50/p99 of
served requests against the lone request, how fast rejections were answered, a lone request right
after the load, how long Triton took to go idle after it, and the share of Triton's work spent on
requests whose clients were gone (transformer steps or classifier texts not delivered to anyone).
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

from api.settings import ApiSettings
from api.slow_clients import raise_open_file_limit
from benchmarks.cpu import CpuMeter, cpu_delta
from benchmarks.fast_http import FastHttpPool
from benchmarks.load import closed_loop, open_loop
from benchmarks.metrics_scrape import scrape
from benchmarks.servers import CAPACITY_ENV, CLASSIFY_STACK, GENERATE_STACK, LOG_DIR, MODEL_REPOSITORY, facade, triton
from benchmarks.workload import GENERATE_PROMPTS, chat_texts
from contract.specs import CLASSIFY, FLUX_TRANSFORMER, GENERATE

log = logging.getLogger(__name__)

RESULT_FILE = Path(__file__).resolve().parent / "results" / "overload.json"


GENERATOR_LATE_LIMIT_MS = 50.0
"""A point whose load generator sent its requests later than this at p99, or sent fewer than
GENERATOR_SENT_SHARE of the arrivals it was to offer, is marked as the generator's limit: every
latency counts from the arrival's scheduled time, so there the generator's own backlog is part of
each figure (it shares the machine's cores with the facade and Triton)."""
GENERATOR_SENT_SHARE = 0.95


def generator_bound(point: dict[str, Any], duration_s: float) -> bool:
    """True when the load generator could not offer `point`'s load (see GENERATOR_LATE_LIMIT_MS)."""
    late = point.get("sender_late_p99_ms") or 0.0
    return late > GENERATOR_LATE_LIMIT_MS or point["sent"] < GENERATOR_SENT_SHARE * point["offered_rps"] * duration_s


WARM_REUSE_S = 2.0
"""An open-loop point opens rate x this many connections first (at most `connections`)."""


@dataclass(frozen=True)
class OverloadSettings:
    duration_s: float = 30.0
    multipliers: tuple[float, ...] = (2.0, 5.0, 10.0)
    endpoints: tuple[str, ...] = (GENERATE.name, CLASSIFY.name)
    client_timeout_s: float = 60.0
    generate_side: int = 128
    generate_steps: int = 4
    connections: int = ApiSettings.model_fields["max_connections"].default - 192
    """Keep-alive connections of the load generator: a fleet of clients behind a proxy, not one new
    TCP connection per arrival (which measures the kernel's accept queue). Before each point it
    opens rate x WARM_REUSE_S of them (at most this many), reused oldest-idle first, so each
    carries one arrival every so often, as an independent client would. When every one is busy an
    arrival waits for one, and then goes out the moment a 503 comes back on it, which the facade
    paces as an immediate retry (api/shedding.py, held up to `shed_max_hold_s`): the open loop has
    become a closed one that can send at most connections / shed_max_hold_s a second, and below the
    arrival rate it never catches up (docs/benchmarks.md, Goodput under immediate retries, has the
    runs). So: as many as the facade accepts (its `max_connections`, beyond which it closes them),
    less room for the lone requests and the metrics scrapes."""
    capacity_s: float = 10.0
    """Closed-loop run that measures capacity (requests per second) for each endpoint."""
    capacity_concurrency: dict[str, int] = field(default_factory=lambda: {GENERATE.name: 8, CLASSIFY.name: 32})
    lone_requests: int = 15
    """Median of this many: the ratios divide by it, and a few samples of a short request vary
    widely (docs/benchmarks.md, "Measurements behind smaller choices")."""
    warmup_requests: int = 3
    idle_timeout_s: float = 120.0
    facade_env: dict[str, str] = field(default_factory=dict)
    """An experiment's facade settings (both facades); empty: make up's defaults."""
    model_repository: Path = MODEL_REPOSITORY
    out: Path = RESULT_FILE
    log_dir: Path = LOG_DIR


@dataclass
class Outcomes:
    served_s: list[float] = field(default_factory=list)
    rejected_s: list[float] = field(default_factory=list)
    rejected_without_retry_after: int = 0
    failed: dict[str, int] = field(default_factory=dict)

    def fail(self, kind: str) -> None:
        self.failed[kind] = self.failed.get(kind, 0) + 1


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


class Endpoint:
    """Requests to one facade route, each classified as served / rejected / failed."""

    def __init__(self, model: str, url: str, s: OverloadSettings) -> None:
        self.model, self.url, self.s = model, url, s
        self.texts = chat_texts()
        self.outcomes = Outcomes()
        self.pool: FastHttpPool | None = None

    def body(self, i: int) -> tuple[str, dict[str, Any]]:
        if self.model == GENERATE.name:
            return "/generate", {
                "prompt": GENERATE_PROMPTS[i % len(GENERATE_PROMPTS)],
                "width": self.s.generate_side,
                "height": self.s.generate_side,
                "steps": self.s.generate_steps,
                "seed": i,
            }
        return "/classify", {"text": self.texts[i % len(self.texts)]}

    async def __call__(self, i: int) -> None:
        assert self.pool is not None
        path, body = self.body(i)
        raw = self.pool.post_bytes(path, json.dumps(body).encode())
        started = time.perf_counter()
        try:
            r = await self.pool.request(raw, self.s.client_timeout_s)
        except TimeoutError:
            self.outcomes.fail("client_timeout")
        except OSError as e:  # ConnectionError and friends
            self.outcomes.fail(type(e).__name__)
        else:
            elapsed = time.perf_counter() - started
            if r.status == 200:
                self.outcomes.served_s.append(elapsed)
                return
            if r.status == 503:
                self.outcomes.rejected_s.append(elapsed)
                if "retry-after" not in r.headers:
                    self.outcomes.rejected_without_retry_after += 1
            else:
                self.outcomes.fail(f"http_{r.status}")
        raise RuntimeError("not served")  # so the load generator counts only served latencies

    def reset(self) -> Outcomes:
        out, self.outcomes = self.outcomes, Outcomes()
        return out


def _work(snapshot: dict, model: str) -> float:
    """Units of Triton work done so far: transformer steps (generate) or classified texts."""
    key = ("nv_inference_count", FLUX_TRANSFORMER if model == GENERATE.name else CLASSIFY.name)
    return snapshot.get(key, 0.0)


async def _wait_idle(metrics_url: str, model: str, timeout_s: float) -> float | None:
    """Seconds until Triton's work counter for `model` stops moving (None: still busy at timeout)."""
    started = time.monotonic()
    last = _work(scrape(metrics_url), model)
    while time.monotonic() - started < timeout_s:
        await asyncio.sleep(1.0)
        now = _work(scrape(metrics_url), model)
        if now == last:
            return round(time.monotonic() - started - 1.0, 1)
        last = now
    return None


async def _lone(endpoint: Endpoint, n: int) -> float:
    """Median of `n` sequential requests, each on a fresh connection: a pooled keep-alive
    connection left idle after a load point may have been closed by the server meanwhile."""
    pooled = endpoint.pool
    try:
        for i in range(n):
            endpoint.pool = FastHttpPool.for_url(endpoint.url, max_connections=1)
            try:
                await endpoint(10_000 + i)
            except RuntimeError:
                pass
            finally:
                await endpoint.pool.close()
    finally:
        endpoint.pool = pooled
    out = endpoint.reset()
    if len(out.served_s) < n:
        log.warning(
            "lone requests: %d of %d served (%d refused, failed: %s)",
            len(out.served_s),
            n,
            len(out.rejected_s),
            out.failed,
        )
    return statistics.median(out.served_s) if out.served_s else float("nan")


async def _capacity(model: str, facade_url: str, s: OverloadSettings) -> float:
    """Closed-loop requests per second; on a facade with its wait bound off (CAPACITY_ENV), so
    that what is measured is how much it serves, not how much of a closed loop it sheds."""
    endpoint = Endpoint(model, facade_url, s)
    endpoint.pool = FastHttpPool.for_url(facade_url, max_connections=s.connections)
    try:
        await _lone(endpoint, s.warmup_requests)  # first inferences after a start are slower
        cap = await closed_loop(endpoint, s.capacity_concurrency[model], s.capacity_s, 100_000)
    finally:
        await endpoint.pool.close()
    log.info("%s: capacity %.2f req/s", model, cap.throughput_rps)
    return cap.throughput_rps


def _cores(meter: CpuMeter, before: dict[str, float], wall_s: float, sent: int) -> dict[str, float]:
    """Cores each side kept busy during a point: the load generator, the facade, Triton with its stubs."""
    used = cpu_delta(before, meter.snapshot(), wall_s, sent)["cpu_s"]
    assert isinstance(used, dict)
    groups = {"load_generator": 0.0, "facade": 0.0, "triton": 0.0}
    for label, seconds in used.items():
        group = label.split(":")[0]  # a server's children count as the server (benchmarks.cpu)
        groups[group] = groups.get(group, 0.0) + seconds
    return {k: round(v / wall_s, 2) for k, v in groups.items()}


async def _bench_endpoint(
    model: str, facade_url: str, metrics_url: str, capacity_rps: float, s: OverloadSettings, meter: CpuMeter
) -> dict[str, Any]:
    endpoint = Endpoint(model, facade_url, s)
    endpoint.pool = FastHttpPool.for_url(facade_url, max_connections=s.connections)
    try:
        await _lone(endpoint, s.warmup_requests)
        lone_s = await _lone(endpoint, s.lone_requests)
        endpoint.reset()
        log.info("%s: lone %.0f ms, capacity %.2f req/s", model, lone_s * 1000, capacity_rps)
        points = []
        for m in s.multipliers:
            rate = capacity_rps * m
            # Every connection the point may use is open before it starts, each reused about every
            # WARM_REUSE_S (within uvicorn's 5 s keep-alive): independent clients, see `connections`.
            await endpoint.pool.warm(int(rate * WARM_REUSE_S))
            before = scrape(metrics_url)
            cpu_before, started = meter.snapshot(), time.monotonic()
            stats = await open_loop(
                endpoint,
                rate,
                s.duration_s,
                max_requests=int(rate * s.duration_s * 2) + 10,
                max_in_flight=100_000,
                drain_timeout_s=s.client_timeout_s + 5,
            )
            cores = _cores(meter, cpu_before, time.monotonic() - started, stats.sent)
            out = endpoint.reset()
            idle_s = await _wait_idle(metrics_url, model, s.idle_timeout_s)
            work = _work(scrape(metrics_url), model) - _work(before, model)
            useful = len(out.served_s) * (s.generate_steps if model == GENERATE.name else 1)
            lone_after_s = await _lone(endpoint, 1)
            points.append(
                {
                    "multiplier": m,
                    "offered_rps": round(rate, 2),
                    "sent": stats.sent,
                    "sender_late_p99_ms": _pct(stats.send_late_s, 99),
                    "cores_busy": cores,
                    "served": len(out.served_s),
                    "rejected": len(out.rejected_s),
                    "failed": sum(out.failed.values()),
                    "failed_by_kind": out.failed,
                    "rejected_without_retry_after": out.rejected_without_retry_after,
                    "served_p50_ms": _pct(out.served_s, 50),
                    "served_p99_ms": _pct(out.served_s, 99),
                    "p99_vs_lone": round(float(np.percentile(out.served_s, 99)) / lone_s, 1) if out.served_s else None,
                    "reject_p50_ms": _pct(out.rejected_s, 50),
                    "reject_max_ms": _pct(out.rejected_s, 100),
                    "lone_after_ms": round(lone_after_s * 1000, 1),
                    "lone_after_vs_lone": round(lone_after_s / lone_s, 2),
                    "idle_after_s": idle_s,
                    "abandoned_work_share": round(max(0.0, work - useful) / work, 3) if work else 0.0,
                }
            )
            points[-1]["generator_bound"] = generator_bound(points[-1], s.duration_s)
            log.info("%s at %gx: %s", model, m, points[-1])
    finally:
        await endpoint.pool.close()
    return {
        "model": model,
        "lone_ms": round(lone_s * 1000, 1),
        "capacity_rps": round(capacity_rps, 2),
        "points": points,
    }


def overload(s: OverloadSettings | None = None) -> dict[str, Any]:
    s = s or OverloadSettings()
    limit = raise_open_file_limit(s.connections + 256)
    if limit < s.connections + 256:
        log.warning("open files limited to %d: fewer than %d connections will open", limit, s.connections)
    result: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
        "endpoints": [],
    }
    required = [CLASSIFY.name, GENERATE.name]
    with triton(s.model_repository, [*CLASSIFY_STACK, *GENERATE_STACK], s.log_dir, tag="overload") as server:
        # uvloop (as the facade runs): the generator's own per-request cost halves, so at 10x it
        # is less late and adds less of its own delay to the latencies it measures.
        with facade(server.grpc_url, required, s.log_dir, extra_env={**s.facade_env, **CAPACITY_ENV}) as unbounded:
            capacity = {model: uvloop.run(_capacity(model, unbounded.url, s)) for model in s.endpoints}
        with facade(server.grpc_url, required, s.log_dir, extra_env=s.facade_env) as api:  # production settings
            for model in s.endpoints:
                meter = CpuMeter({"facade": api.proc.pid, "triton": server.process.pid})
                bench = _bench_endpoint(model, api.url, server.metrics_url, capacity[model], s, meter)
                result["endpoints"].append(uvloop.run(bench))
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.out.write_text(json.dumps(result, indent=2))
    s.out.with_suffix(".md").write_text(render_markdown(result))
    return result


def render_markdown(result: dict[str, Any]) -> str:
    """docs/benchmarks.md's overload table (headed by the facade settings an experiment changed)."""
    changed = result.get("settings", {}).get("facade_env")
    lines = [f"The facade's settings changed for this run: {changed}", ""] if changed else []
    lines += [
        "| endpoint | load | offered req/s | served | rejected (503) | failed | served p50 / p99 ms | p99 vs lone | "
        "rejection p50 / max ms | lone after (vs lone) | idle after s | work on abandoned | load generator late p99 ms | "
        "cores busy: load generator / facade / Triton |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bound = False
    for ep in result["endpoints"]:
        for p in ep["points"]:
            mark = " †" if p.get("generator_bound") else ""
            bound = bound or bool(mark)
            lines.append(
                f"| /{ep['model']} (lone {ep['lone_ms']} ms, capacity {ep['capacity_rps']} req/s) | {p['multiplier']:g}x{mark} | "
                f"{p['offered_rps']} | {p['served']} | {p['rejected']} | {p['failed']} | {p['served_p50_ms']} / "
                f"{p['served_p99_ms']} | {p['p99_vs_lone']}x | {p['reject_p50_ms']} / {p['reject_max_ms']} | "
                f"{p['lone_after_ms']} ms ({p['lone_after_vs_lone']}x) | {p['idle_after_s']} | "
                f"{p['abandoned_work_share'] * 100:.1f}% | {p.get('sender_late_p99_ms')} | {_cores_cell(p)} |"
            )
    if bound:
        lines += [
            "",
            f"† The load generator could not offer this load (late by more than {GENERATOR_LATE_LIMIT_MS:g} ms at p99, "
            f"or under {GENERATOR_SENT_SHARE:.0%} of the arrivals sent): its own backlog is in every latency of the row.",
        ]
    return "\n".join(lines) + "\n"


def _cores_cell(point: dict[str, Any]) -> str:
    cores = point.get("cores_busy")
    if not cores:
        return "–"
    return " / ".join(f"{cores.get(k, 0.0):.2f}" for k in ("load_generator", "facade", "triton"))
