"""Run a request's Triton work until it is done, its client disconnects or its deadline passes.

Starlette does not cancel a handler when its client goes away, so the work would run on inside
Triton for nobody. Here the work is a task raced against the connection and a deadline; the
loser is cancelled, and cancelling a task awaiting `tritonclient.grpc.aio` cancels its gRPC call,
which Triton passes on to the model (`request.is_cancelled()` in serving/triton_generate.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, TypeVar

from starlette.requests import Request

from contract.errors import RequestCancelledError, RequestTimeoutError, ServerUnavailableError

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was already read, so only disconnect remains)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _finish(tasks: Sequence[asyncio.Future[Any]]) -> None:
    for task in tasks:
        if not task.done():
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def bounded(
    request: Request, work: Coroutine[Any, Any, T], timeout_s: float, stopping: asyncio.Event | None = None
) -> T:
    """`await work`, unless the client disconnects (RequestCancelledError), `timeout_s` passes
    (RequestTimeoutError) or the server begins to stop (`stopping` set: ServerUnavailableError,
    503 + Retry-After) first; the work is cancelled in all three cases. A server stopping must end
    work this way, before it cancels handlers: a cancelled handler can only answer 500."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    stop = asyncio.ensure_future((stopping or asyncio.Event()).wait())
    try:
        done, _ = await asyncio.wait({task, watch, stop}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled
        await _finish([watch, stop, *([] if task.done() else [task])])
    if task in done:
        return task.result()
    if watch in done:
        raise RequestCancelledError("the client disconnected; its work was cancelled")
    if stop in done:
        raise ServerUnavailableError("the server is shutting down; retry shortly")
    raise RequestTimeoutError(f"not finished within {timeout_s:g}s; the work was cancelled")


async def all_or_nothing(*works: Awaitable[T]) -> list[T]:
    """Await all; the first failure cancels the others and is raised (one fate for a request's
    images: no point finishing three images of a request that will answer with an error)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_as_coroutine(w)) for w in works]
    except BaseExceptionGroup as eg:
        first = eg.exceptions[0]
        # Keep its cause: api.errors.public_message shows only our own messages (no cause) as
        # they are; `from None` would pass Triton's raw text to the client.
        raise first from first.__cause__
    return [t.result() for t in tasks]


async def _as_coroutine(work: Awaitable[T]) -> T:
    return await work
