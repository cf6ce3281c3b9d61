"""Closed- and open-loop load on one asyncio loop, bounded in request count and in time.

A target is an async callable `request(i)` that sends request number i and raises on any failure
(transport error, non-200, malformed body). Latency is measured around that call; in open loop it
is measured from the *scheduled* send time, so a server that falls behind cannot hide its queue
(no coordinated omission). Both tune the generator's garbage collector for the run
(common.collector): its full collections over thousands of connections paused the loop that reads
the answers, and those pauses were counted as the server's latency.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from common.collector import collector_tuned

log = logging.getLogger(__name__)

RequestFn = Callable[[int], Awaitable[None]]
MAX_ERROR_SAMPLES = 5


@dataclass
class LoadStats:
    """The outcome of one load run. `latencies_s` holds successful requests only."""

    mode: str  # "closed" | "open"
    concurrency: int | None
    rate_rps: float | None
    sent: int = 0
    errors: int = 0
    dropped: int = 0
    """Open loop only: arrivals not sent because `max_in_flight` requests were outstanding."""
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    send_late_s: list[float] = field(default_factory=list)
    """Open loop only: how late each request started against its schedule. Large values mean the
    load generator itself could not keep up (it shares the machine), not the server."""
    error_samples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput_rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return math.nan
        return float(np.percentile(np.asarray(self.latencies_s), q) * 1000.0)

    def record_error(self, e: BaseException) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(f"{type(e).__name__}: {str(e)[:200]}")

    def summary(self) -> dict[str, object]:
        lat = np.asarray(self.latencies_s) * 1000.0
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate_rps": self.rate_rps,
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "dropped": self.dropped,
            "wall_s": round(self.wall_s, 3),
            "throughput_rps": round(self.throughput_rps, 3),
            "mean_ms": round(float(lat.mean()), 3) if lat.size else math.nan,
            "p50_ms": round(self.percentile_ms(50), 3),
            "p90_ms": round(self.percentile_ms(90), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "max_ms": round(float(lat.max()), 3) if lat.size else math.nan,
            "error_samples": list(self.error_samples),
        }


async def closed_loop(request: RequestFn, concurrency: int, duration_s: float, max_requests: int) -> LoadStats:
    """`concurrency` workers, each sending its next request as soon as the last one answers.

    Stops issuing at `max_requests` or after `duration_s`, whichever comes first; in-flight
    requests are awaited (their own client timeouts bound that wait).
    """
    stats = LoadStats("closed", concurrency, None)
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        while stats.sent < max_requests and time.perf_counter() < deadline:
            i = stats.sent
            stats.sent += 1
            t0 = time.perf_counter()
            try:
                await request(i)
            except Exception as e:  # every failure counts; the run goes on
                stats.record_error(e)
            else:
                stats.latencies_s.append(time.perf_counter() - t0)

    with collector_tuned():  # before the clock starts: its collection is not the server's time
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        stats.wall_s = time.perf_counter() - started
    return stats


async def open_loop(
    request: RequestFn,
    rate_rps: float,
    duration_s: float,
    max_requests: int,
    max_in_flight: int = 512,
    drain_timeout_s: float = 30.0,
    seed: int = 0,
) -> LoadStats:
    """Poisson arrivals at `rate_rps` (seeded), each sent on its own task whatever the backlog.

    Arrivals stop at `max_requests` or `duration_s`. Beyond `max_in_flight` outstanding requests an
    arrival is dropped (counted, and as an error), which bounds memory when a server stalls.
    Requests still running `drain_timeout_s` after the last arrival are cancelled as errors.
    """
    stats = LoadStats("open", None, rate_rps)
    rng = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, scheduled: float) -> None:
        stats.send_late_s.append(time.perf_counter() - scheduled)
        try:
            await request(i)
        except asyncio.CancelledError:
            stats.record_error(TimeoutError("still running after the drain timeout"))
            raise
        except Exception as e:
            stats.record_error(e)
        else:
            stats.latencies_s.append(time.perf_counter() - scheduled)

    with collector_tuned():
        started = time.perf_counter()
        next_t = started
        while stats.sent + stats.dropped < max_requests:
            next_t += rng.expovariate(rate_rps)
            if next_t - started > duration_s:
                break
            delay = next_t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= max_in_flight:
                stats.dropped += 1
                stats.record_error(RuntimeError(f"dropped: {max_in_flight} requests in flight"))
                continue
            task = asyncio.create_task(one(stats.sent, next_t))
            stats.sent += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=drain_timeout_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
    stats.wall_s = time.perf_counter() - started
    return stats
