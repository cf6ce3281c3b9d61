"""One fate for a request's Triton work: it ends when the work is done, one part of it fails, its
client disconnects, its deadline passes or the server begins to stop, whichever comes first.

Starlette does not cancel a handler when its client goes away, so the work would run on inside
Triton for nobody. Here the work is an async iterator raced against the connection, a deadline and
the server's stop; the loser is cancelled, and cancelling a task awaiting `tritonclient.grpc.aio`
cancels its gRPC call, which Triton passes on to the model (`request.is_cancelled()` in
serving/triton_generate.py; a decoupled stream stops at its next step).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request

from contract.errors import RequestCancelledError, RequestTimeoutError, ServerUnavailableError

T = TypeVar("T")

Gone = Callable[[], Awaitable[None]]
"""Returns when the client has gone (api.cancellation.disconnected for a plain HTTP answer; a
streamed answer needs none: sse-starlette cancels the stream itself when its client leaves)."""


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was already read, so only disconnect remains)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merged(*sources: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """The items of all `sources`, run concurrently, in the order they come. The first failure
    cancels the others and is raised as it was, its cause kept (api.errors.public_message shows
    only our own messages, those without a cause, as they are: losing the cause would pass
    Triton's raw text to the client). Leaving early cancels them all too: one fate for a
    request's images, no point finishing three images of a request that answers with an error."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def pump(source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                queue.put_nowait(("item", item))
        except Exception as e:  # noqa: BLE001  (raised by the consumer below)
            queue.put_nowait(("failed", e))
        else:
            queue.put_nowait(("ended", None))

    tasks = [asyncio.ensure_future(pump(s)) for s in sources]
    running = len(tasks)
    try:
        while running:
            kind, value = await queue.get()
            if kind == "item":
                yield value
            elif kind == "failed":
                raise value
            else:
                running -= 1
    finally:
        await _cancel(tasks)


async def guarded(
    source: AsyncGenerator[T, None], timeout_s: float, stopping: asyncio.Event | None = None, gone: Gone | None = None
) -> AsyncGenerator[T, None]:
    """`source`'s items, unless `gone()` returns (RequestCancelledError), `timeout_s` passes
    (RequestTimeoutError) or `stopping` is set (ServerUnavailableError, 503 + Retry-After) first;
    `source` is closed (its work cancelled) in all three cases, and when the caller stops early.
    A server stopping must end work this way, before it cancels handlers: a cancelled handler can
    only answer 500."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    watchers: dict[asyncio.Future[Any], Callable[[], Exception]] = {}
    if gone is not None:
        watchers[asyncio.ensure_future(gone())] = lambda: RequestCancelledError(
            "the client disconnected; its work was cancelled"
        )
    if stopping is not None:
        watchers[asyncio.ensure_future(stopping.wait())] = lambda: ServerUnavailableError(
            "the server is shutting down; retry shortly"
        )
    step: asyncio.Future[T] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait(
                {step, *watchers}, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
            if step in done:
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                yield item
                continue
            for watcher in done:
                raise watchers[watcher]()
            raise RequestTimeoutError(f"not finished within {timeout_s:g}s; the work was cancelled")
    finally:  # also when the caller is cancelled or stops early
        await _cancel([*watchers, *([step] if step is not None else [])])
        await source.aclose()


async def _cancel(tasks: list[asyncio.Future[Any]]) -> None:
    for task in tasks:
        if not task.done():
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
