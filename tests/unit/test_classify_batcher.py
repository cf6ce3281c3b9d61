"""api/classify_batcher.py: concurrent requests share calls, each gets its own answers, and a
caller that leaves or a call that fails affects only whom it should.

The call here is a stand-in for the Triton client whose completion the test controls (the
integration tests run the batcher against the real Triton through the facade)."""

from __future__ import annotations

import asyncio

import pytest

from api.classify_batcher import ClassifyBatcher
from client.triton_client import ClassifyResult


class Gate:
    """A classify call that answers each text with its own text as the label, when released."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release: list[asyncio.Event] = []
        self.fail_next: Exception | None = None

    async def __call__(self, texts: list[str]) -> list[ClassifyResult]:
        self.calls.append(list(texts))
        event = asyncio.Event()
        self.release.append(event)
        await event.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        return [ClassifyResult(label=t, score=1.0, scores={}, model_version="1") for t in texts]

    async def called(self, n: int) -> None:
        while len(self.calls) < n:
            await asyncio.sleep(0)


def labels(results: list[ClassifyResult]) -> list[str]:
    return [r.label for r in results]


def test_a_lone_request_goes_at_once_and_queued_ones_share_the_next_call() -> None:
    async def scenario() -> None:
        gate = Gate()
        sizes: list[int] = []
        batcher = ClassifyBatcher(gate, max_texts=64, max_inflight=1, on_call=sizes.append)
        first = asyncio.create_task(batcher.classify(["a"]))
        await gate.called(1)
        queued = [asyncio.create_task(batcher.classify(t)) for t in (["b", "c"], ["d"], ["e", "f", "g"])]
        for _ in range(5):
            await asyncio.sleep(0)
        assert gate.calls == [["a"]]  # one slot: the others wait for it
        gate.release[0].set()
        assert labels(await first) == ["a"]
        await gate.called(2)
        assert gate.calls[1] == ["b", "c", "d", "e", "f", "g"]
        gate.release[1].set()
        assert [labels(await q) for q in queued] == [["b", "c"], ["d"], ["e", "f", "g"]]
        assert sizes == [1, 6]

    asyncio.run(scenario())


def test_requests_arriving_in_the_same_turn_share_a_free_slot() -> None:
    async def scenario() -> None:
        gate = Gate()
        batcher = ClassifyBatcher(gate, max_texts=64, max_inflight=1)
        burst = [asyncio.create_task(batcher.classify([t])) for t in "abc"]
        await gate.called(1)
        for _ in range(5):
            await asyncio.sleep(0)
        assert gate.calls == [["a", "b", "c"]]  # not ["a"] alone, then ["b", "c"]
        gate.release[0].set()
        assert [labels(await t) for t in burst] == [["a"], ["b"], ["c"]]

    asyncio.run(scenario())


def test_a_call_never_exceeds_max_texts() -> None:
    async def scenario() -> None:
        gate = Gate()
        batcher = ClassifyBatcher(gate, max_texts=4, max_inflight=1)
        blocker = asyncio.create_task(batcher.classify(["x"]))
        await gate.called(1)
        waiting = [asyncio.create_task(batcher.classify([f"{i}a", f"{i}b", f"{i}c"])) for i in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        for n in range(4):  # the blocker, then one call per waiter: two would be 6 texts
            await gate.called(n + 1)
            gate.release[n].set()
        await blocker
        assert [labels(await w) for w in waiting] == [[f"{i}a", f"{i}b", f"{i}c"] for i in range(3)]
        assert all(len(c) <= 4 for c in gate.calls)
        with pytest.raises(ValueError):
            await batcher.classify(["t"] * 5)

    asyncio.run(scenario())


def test_several_calls_in_flight_when_allowed() -> None:
    async def scenario() -> None:
        gate = Gate()
        batcher = ClassifyBatcher(gate, max_texts=64, max_inflight=3)
        tasks = [asyncio.create_task(batcher.classify([t])) for t in "abc"]
        await gate.called(3)
        assert gate.calls == [["a"], ["b"], ["c"]]
        for event in gate.release:
            event.set()
        assert [labels(await t) for t in tasks] == [["a"], ["b"], ["c"]]

    asyncio.run(scenario())


def test_a_caller_that_leaves_drops_only_its_own_texts() -> None:
    async def scenario() -> None:
        gate = Gate()
        batcher = ClassifyBatcher(gate, max_texts=64, max_inflight=1)
        first = asyncio.create_task(batcher.classify(["a"]))
        await gate.called(1)
        gone = asyncio.create_task(batcher.classify(["gone"]))
        stays = asyncio.create_task(batcher.classify(["stays"]))
        for _ in range(3):
            await asyncio.sleep(0)
        gone.cancel()
        first.cancel()  # leaves while its call is in flight: the call still ends for the batcher
        gate.release[0].set()
        await gate.called(2)
        assert gate.calls[1] == ["stays"]  # the queued caller that left is never sent
        gate.release[1].set()
        assert labels(await stays) == ["stays"]
        assert gone.cancelled() and first.cancelled()
        assert batcher._inflight == 0

    asyncio.run(scenario())


def test_a_failed_call_fails_its_callers_and_the_next_call_works() -> None:
    async def scenario() -> None:
        gate = Gate()
        batcher = ClassifyBatcher(gate, max_texts=64, max_inflight=1)
        gate.fail_next = ConnectionError("triton down")
        a, b = asyncio.create_task(batcher.classify(["a"])), None
        await gate.called(1)
        b = asyncio.create_task(batcher.classify(["b"]))
        c = asyncio.create_task(batcher.classify(["c"]))
        gate.release[0].set()
        with pytest.raises(ConnectionError):
            await a
        await gate.called(2)
        gate.fail_next = TimeoutError("slow")
        gate.release[1].set()
        for t in (b, c):  # both shared the second call, so both see its error
            with pytest.raises(TimeoutError):
                await t
        d = asyncio.create_task(batcher.classify(["d"]))
        await gate.called(3)
        gate.release[2].set()
        assert labels(await d) == ["d"]

    asyncio.run(scenario())
