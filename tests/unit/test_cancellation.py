"""api.cancellation: one fate for a request's Triton work. `merged` runs a request's images
together (the first failure cancels the rest, its cause kept); `guarded` ends the work when the
client leaves, the deadline passes or the server stops, and when its caller stops early.
(The first three tests moved here from test_admission.py with all_or_nothing/bounded, which
these replace.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from tritonclient.utils import InferenceServerException

from api.cancellation import guarded, merged
from contract.errors import (
    OverloadedError,
    RequestCancelledError,
    RequestTimeoutError,
    ServerUnavailableError,
    translate,
)


class Work:
    """Sources that yield their index, then wait forever; they record being started and cancelled."""

    def __init__(self) -> None:
        self.started: set[int] = set()
        self.cancelled: list[int] = []
        self.closed: list[int] = []
        self.arrived = asyncio.Condition()

    async def forever(self, i: int) -> AsyncIterator[int]:
        async with self.arrived:
            self.started.add(i)
            self.arrived.notify_all()
        try:
            yield i
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(i)
            raise
        except GeneratorExit:
            self.closed.append(i)
            raise

    async def wait_started(self, *indices: int) -> None:
        async with asyncio.timeout(10), self.arrived:
            await self.arrived.wait_for(lambda: self.started >= set(indices))


def test_one_failed_image_cancels_the_others() -> None:
    work = Work()

    async def bad() -> AsyncIterator[int]:
        await work.wait_started(0, 2)  # the others are running when it fails
        raise OverloadedError("full")
        yield 1  # an async generator

    async def run() -> None:
        with pytest.raises(OverloadedError):
            async for _ in merged(work.forever(0), bad(), work.forever(2)):
                pass
        assert sorted(work.cancelled) == [0, 2]  # before the failure reached the caller

    asyncio.run(run())


def test_one_fate_keeps_the_failures_cause_so_tritons_text_stays_private() -> None:
    """api.errors.public_message replaces a message built from a lower layer's exception (it has a
    cause) with a fixed one; the image that failed first must reach it with its cause intact."""

    async def lost() -> AsyncIterator[int]:
        try:
            raise InferenceServerException(msg="Stream removed (Socket closed)", status="StatusCode.UNAVAILABLE")
        except InferenceServerException as e:
            raise translate(e) from e
        yield 1

    async def run() -> None:
        async for _ in merged(lost(), lost()):
            pass

    with pytest.raises(ServerUnavailableError) as info:
        asyncio.run(run())
    assert isinstance(info.value.__cause__, InferenceServerException)


def test_shutdown_cancels_the_work_and_answers_503() -> None:
    """When the server begins to stop, in-flight work is cancelled and the request gets a 503."""
    work = Work()

    async def run() -> None:
        stopping = asyncio.Event()

        async def consume() -> None:
            async for _ in guarded(merged(work.forever(0), work.forever(1)), 60, stopping):
                pass

        handler = asyncio.ensure_future(consume())
        await work.wait_started(0, 1)
        stopping.set()
        with pytest.raises(ServerUnavailableError, match="shutting down"):
            await handler
        assert sorted(work.cancelled) == [0, 1]

    asyncio.run(run())


def test_a_client_that_leaves_cancels_the_work() -> None:
    work = Work()

    async def run() -> None:
        gone = asyncio.Event()
        items = []

        async def consume() -> None:
            async for i in guarded(merged(work.forever(0), work.forever(1)), 60, asyncio.Event(), gone.wait):
                items.append(i)

        handler = asyncio.ensure_future(consume())
        await work.wait_started(0, 1)
        gone.set()
        with pytest.raises(RequestCancelledError, match="disconnected"):
            await handler
        assert sorted(items) == [0, 1]  # what came before the client left was passed on
        assert sorted(work.cancelled) == [0, 1]

    asyncio.run(run())


def test_the_deadline_cancels_the_work() -> None:
    work = Work()

    async def run() -> None:
        with pytest.raises(RequestTimeoutError, match="within 0.05s"):
            async for _ in guarded(merged(work.forever(0)), 0.05):
                pass
        assert work.cancelled == [0]

    asyncio.run(run())


def test_a_caller_that_stops_early_closes_the_work_at_once() -> None:
    """Leaving after the first item (an SSE answer whose client left between events) must stop
    the work now, not when the garbage collector finalizes the generators."""
    work = Work()

    async def run() -> None:
        stream = guarded(merged(work.forever(0), work.forever(1)), 60)
        first = await anext(stream)
        await work.wait_started(0, 1)
        await stream.aclose()
        assert first in (0, 1)
        # Both were cancelled (waiting) or closed (suspended at their yield) before aclose returned.
        assert sorted(work.cancelled + work.closed) == [0, 1]

    asyncio.run(run())


def test_items_pass_through_and_the_end_is_the_end() -> None:
    async def numbers(start: int) -> AsyncIterator[int]:
        for i in range(start, start + 3):
            yield i

    async def run() -> list[int]:
        return [i async for i in guarded(merged(numbers(0), numbers(10)), 60, asyncio.Event())]

    assert sorted(asyncio.run(run())) == [0, 1, 2, 10, 11, 12]
