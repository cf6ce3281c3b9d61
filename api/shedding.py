"""Shed load before it costs anything: 503 + Retry-After ahead of routing and body parsing.

Admission control (api.admission) decides inside the handler, after FastAPI has read and
validated the body, resolved dependencies and checked the key. When the facade itself is the
bottleneck (a /classify burst on a small machine) that work is most of a request's cost, so
rejecting there still saturates the event loop: requests queue in the loop before admission
sees them, served latency and rejection time grow to seconds, and connections start failing.

One estimate is checked here, per request, in a few microseconds: how long a request that has
just arrived will have waited before its own work starts, i.e. the sum of
* how late the event loop is: `LoopLag` measures how late a periodic timer fires, which is how
  long a request waits before the facade gets to read it, and
* the route's cost queue: work admitted and not finished, over the measured throughput.
Over the route's maximum wait, the request is shed. Counting both (not either) matters under
heavy overload: the loop is then late by a good part of the bound, and a request admitted on the
queue alone would wait the lag *and* the queue, which is what made accepted p99 run to 3x the bound.
Neither sheds a request when the route has nothing in flight: as in admission, a lone request is
always served (on a busy host the process itself may be descheduled, which looks like lag).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from api.admission import Admission, CostQueue
from api.errors import retry_after, send_error

LAG_INTERVAL_S = 0.01
LAG_SMOOTHING = 0.5
"""Weight of the newest lag sample: high, so that the signal drops as soon as the loop catches up."""


class LoopLag:
    """A moving average of how late the event loop runs a timer (seconds)."""

    def __init__(self, interval_s: float = LAG_INTERVAL_S, smoothing: float = LAG_SMOOTHING) -> None:
        self.interval_s, self.smoothing = interval_s, smoothing
        self.lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval_s)
            late = max(0.0, loop.time() - before - self.interval_s)
            self.lag_s = (1 - self.smoothing) * self.lag_s + self.smoothing * late


@dataclass(frozen=True)
class ShedRoute:
    """Stands in for the matched route in the scope, so rejected requests are counted under the
    route's own label in /metrics (api.metrics reads `scope["route"].path`)."""

    path: str


def shed_reason(queue: CostQueue, lag_s: float) -> tuple[str, float] | None:
    """(message, retry-after seconds) when a request for `queue` must be shed now, else None."""
    if queue.in_flight == 0:
        return None  # a lone request is always served (a descheduled process is late too)
    if lag_s > queue.max_wait_s:
        return f"the server is saturated (requests wait {lag_s:.2f}s before being read); retry later", 1.0
    wait = queue.estimated_wait_s()
    if lag_s + wait > queue.max_wait_s:
        return (
            f"{queue.name} is at capacity: about {wait:.1f}s of work is ahead (limit {queue.max_wait_s:g}s); retry later",
            max(1.0, wait - queue.max_wait_s),
        )
    return None


class EarlyShedMiddleware:
    """Answers 503 + Retry-After for POSTs to the routes in `queues` when `shed_reason` says so,
    without reading the body (uvicorn discards the unread rest; the connection stays usable)."""

    def __init__(
        self,
        app: ASGIApp,
        admission: Callable[[], Admission | None],
        lag: Callable[[], LoopLag | None],
        queues: dict[str, Callable[[Admission], CostQueue]],
    ) -> None:
        self.app, self.admission, self.lag, self.queues = app, admission, lag, queues

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pick = self.queues.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        admission, lag = self.admission(), self.lag()
        if pick is not None and admission is not None:
            reason = shed_reason(pick(admission), lag.lag_s if lag is not None else 0.0)
            if reason is not None:
                scope["route"] = ShedRoute(scope["path"])
                await _unavailable(send, *reason)
                return
        await self.app(scope, receive, send)


async def _unavailable(send: Send, message: str, retry_after_s: float) -> None:
    await send_error(send, 503, "unavailable", message, retry_after(retry_after_s))
