"""Shed load before it costs anything: 503 + Retry-After ahead of every middleware, routing and
body parsing.

Admission control (api.admission) decides inside the handler, after FastAPI has read and
validated the body, resolved dependencies and checked the key. Under clients that retry at once
(load balancers, wrk, a busy fleet: closed loop, Retry-After ignored) every refusal comes straight
back, so what a refusal costs is taken from serving, again and again. So the same decision is made
here first, on what is queued, in a few microseconds, by one `Shedder`: in the facade's HTTP
protocol as soon as a request's headers are in (api/slow_clients.py: no ASGI request is built at
all), and by `EarlyShed`, which wraps the whole application (outermost, before request ids, metrics
and the Host check) for what reaches it. Both answer with bytes built once per route and
Retry-After value and count the refusal in one pre-bound counter: no logging, no label lookups, no
body read (the unread rest is discarded; the connection stays usable).

The decision: a route's cost queue (api.admission.CostQueue) has room for a typical request,
where the room shrinks by how late the event loop is (`LoopLag`: how long a request that has just
arrived waits before the facade reads it), but never below the floor: under a storm the loop
is late because of the storm, and a bound that shrank to nothing would refuse the work that keeps
the server busy. A lone request is always served.

Refusals of clients that retry at once are also paced (`RefusalPacer`, here and for the
handler's own 503s, api/errors.py): a connection refused again within a few milliseconds of its
last refusal waits its turn, at most `max_hold_s`, so it retries at the pace the server chooses
instead of spinning on 503s (the faster a refusal, the faster such a client spins: cheap refusals
alone only moved the CPU from serving to refusing). Independent arrivals and clients that honour
Retry-After get their 503 at once. What it does to goodput: docs/decisions/admission-and-pacing.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from api.admission import ENTRY, Admission, CostQueue, Entry
from api.errors import error_messages

MIN_HOLD_S = 0.001
"""A shorter hold is answered at once (a timer costs more than it paces)."""
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


class RefusalPacer:
    """Holds the refusals of clients that retry at once; answers every other refusal at once.

    A refusal is held only when the same connection was refused less than `retry_window_s`
    before this request arrived: a client that sends its next request as soon as a 503 arrives
    (wrk, a load balancer). Independent arrivals (an open loop, each on an idle connection of a
    pool or a new one) come back later or never, and keep their immediate 503: holding them too
    only ties up their connections (docs/decisions/admission-and-pacing.md). A retry is held
    `pending / budget_per_s` (the retries waiting now, at the budget's pace), at most `max_hold_s`.
    """

    MAX_TRACKED = 65536
    """Connections remembered (a connection is its client address and port); beyond, forget all."""

    def __init__(self, budget_per_s: float, max_hold_s: float, retry_window_s: float = 0.01) -> None:
        self.budget_per_s, self.max_hold_s, self.retry_window_s = budget_per_s, max_hold_s, retry_window_s
        self.pending = 0
        self._refused_at: dict[object, float] = {}

    def hold_s(self) -> float:
        if self.max_hold_s <= 0 or self.budget_per_s <= 0:
            return 0.0
        return min(self.max_hold_s, self.pending / self.budget_per_s)

    def begin(self, client: object, lag_s: float) -> float | None:
        """This refusal's hold: None when it is not an immediate retry of `client` (answer at once),
        else seconds to hold it (counted as pending until `end`). `lag_s`, how late the event loop
        runs, is taken off the gap: a retry that arrived at once was read late."""
        last = self._refused_at.pop(client, None) if client is not None else None
        if last is None or time.monotonic() - last - lag_s >= self.retry_window_s:
            return None
        self.pending += 1
        return self.hold_s()

    def end(self, client: object, hold: float | None) -> None:
        """The refusal with `begin`'s `hold` has been answered (or its client went away)."""
        if hold is not None:
            self.pending -= 1
        if client is not None:
            if len(self._refused_at) >= self.MAX_TRACKED:
                self._refused_at.clear()
            self._refused_at[client] = time.monotonic()

    async def held(self, client: object = None, lag_s: float = 0.0) -> None:
        """Wait this refusal's turn if it is an immediate retry of `client` (the scope's client
        address; None: not tracked, never held); the caller answers afterwards."""
        hold = self.begin(client, lag_s)
        try:
            if hold is not None and hold >= MIN_HOLD_S:
                await asyncio.sleep(hold)
        finally:
            self.end(client, hold)


@dataclass(frozen=True)
class ShedRoute:
    """One route that is shed here: its cost queue and a counter (a pre-bound metrics child)
    incremented per refusal."""

    queue: Callable[[Admission], CostQueue]
    count: Callable[[], None]


def should_shed(queue: CostQueue, lag_s: float) -> bool:
    """True when a request of the typical admitted cost could not be admitted now (the body is not
    read here; the handler's admission decides on the real cost of what passes)."""
    return not queue.has_room(queue.typical_cost, lag_s)


class Shedder:
    """The refusal decision and its answers, shared by the two places that refuse: the HTTP
    protocol's fast path (api/slow_clients.py, before uvicorn builds an ASGI request) and
    `EarlyShed` (the ASGI app's outermost layer, for what reaches it: other servers, the in-process
    tests, a request pipelined behind another)."""

    def __init__(
        self,
        admission: Callable[[], Admission | None],
        lag_s: Callable[[], float],
        routes: dict[str, ShedRoute],
        pacer: RefusalPacer,
    ) -> None:
        self.admission, self.lag_s, self.routes, self.pacer = admission, lag_s, routes, pacer
        self._answers: dict[tuple[str, int], tuple[dict, dict, bytes]] = {}

    def refusing(self, method: str, path: str) -> CostQueue | None:
        """The route's queue when a request to `path` is to be refused now (and counts it), else None."""
        route = self.routes.get(path)
        if route is None or method != "POST":
            return None
        admission = self.admission()
        if admission is None:
            return None
        queue = route.queue(admission)
        if not should_shed(queue, self.lag_s()):
            return None
        route.count()
        return queue

    def entry(self, method: str, path: str) -> Entry | None:
        """Room for a typical request to `path`, held from the door (which has just let it in) until
        its handler admits it; None for a request not shed here."""
        route = self.routes.get(path) if method == "POST" else None
        admission = self.admission() if route is not None else None
        if route is None or admission is None:
            return None
        queue = route.queue(admission)
        return Entry(queue, queue.typical_cost)

    def answer(self, path: str, queue: CostQueue) -> tuple[dict, dict, bytes]:
        """The refusal as ASGI messages (start, body) and as HTTP/1.1 bytes from the status line's
        end to the body's end, less the server's default headers (date, server) and `connection`;
        built once per (route, Retry-After seconds)."""
        seconds = max(1, min(60, round(queue.retry_after_s())))
        key = (path, seconds)
        found = self._answers.get(key)
        if found is None:
            message = f"{queue.name} is at capacity; retry after {seconds}s"
            start, body = error_messages(503, "unavailable", message, {"Retry-After": str(seconds)})
            head = b"".join(name + b": " + value + b"\r\n" for name, value in start["headers"])
            found = (start, body, head + b"\r\n" + body["body"])
            self._answers[key] = found
        return found


class EarlyShed:
    """Wraps the whole ASGI app: POSTs to the shedder's routes are answered 503 + Retry-After when
    it says so, after the pacer's hold, without reading the body."""

    def __init__(self, app: ASGIApp, shedder: Shedder) -> None:
        self.app, self.shedder = app, shedder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A request the protocol's door let in holds its room (ENTRY) and is not judged again here.
        if scope["type"] == "http" and ENTRY.get() is None:
            queue = self.shedder.refusing(scope["method"], scope.get("path", ""))
            if queue is not None:
                await self.shedder.pacer.held(scope.get("client"), self.shedder.lag_s())
                start, body, _ = self.shedder.answer(scope["path"], queue)
                await send(start)
                await send(body)
                return
        await self.app(scope, receive, send)
