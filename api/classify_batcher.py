"""Coalesce concurrent /classify requests into shared Triton calls.

Triton's dynamic batcher already merges requests into one encoder batch, but each request still
pays its own gRPC call from the facade, its own request in Triton's core and its own response in
the `classify` python model, a sizeable share of what the int8 encoder itself costs per text
(docs/decisions/classify-shared-calls.md). Here concurrent requests' texts travel
together as one `classify` request of up to `max_texts` texts, so that overhead is paid once per
call instead of once per HTTP request.

No timer: a request that finds a free call slot goes on the event loop's next turn, with every
request whose body arrived in the same turn (a lone request waits for nothing). Texts wait only
while `max_inflight` calls are already out; when one returns, everything queued meanwhile leaves
together. Under load batches grow by themselves; when idle they are size 1. Taking the texts one
turn late matters under load: the clients answered by one call send their next requests in a burst,
and when the first of them took a free slot alone, calls stayed small; taken a turn late, they
fill up (docs/decisions/classify-shared-calls.md).

A caller that goes away (client disconnect, cancelled task) drops only its own texts: queued ones
are never sent, and a shared call already in flight finishes for the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from client.triton_client import ClassifyResult

log = logging.getLogger(__name__)

ClassifyCall = Callable[[list[str]], Awaitable[list[ClassifyResult]]]


@dataclass
class _Waiting:
    texts: list[str]
    future: asyncio.Future[list[ClassifyResult]]


@dataclass
class ClassifyBatcher:
    call: ClassifyCall
    """One Triton `classify` request for a list of texts (AsyncTritonClient.classify)."""
    max_texts: int
    """Texts per shared call: the `classify` model's max_batch_size (one request may not exceed it)."""
    max_inflight: int
    """Shared calls out at once; more keep Triton's instances busy, fewer make bigger batches."""
    on_call: Callable[[int], None] | None = None
    """Told the number of texts of every shared call (a metric)."""
    _queue: deque[_Waiting] = field(default_factory=deque)
    _inflight: int = 0
    _starting: int = 0
    """Calls created but not yet started (their texts not yet taken)."""
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    """The loop keeps only weak references to tasks: these are ours until they end."""

    async def classify(self, texts: list[str]) -> list[ClassifyResult]:
        if len(texts) > self.max_texts:
            raise ValueError(f"{len(texts)} texts exceed the {self.max_texts} of one call")
        future: asyncio.Future[list[ClassifyResult]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(texts, future))
        self._dispatch()
        # Cancelling the caller cancels its future only; _take skips it if it is still queued.
        return await future

    def _dispatch(self) -> None:
        # A slot is claimed now, but the texts are taken when the task first runs, one loop turn
        # later: requests whose bodies arrived in the same turn (a burst of clients answering the
        # last call's responses) then share this call instead of following it one by one.
        while self._inflight < self.max_inflight and len(self._queue) > self._starting:
            self._inflight += 1
            self._starting += 1
            task = asyncio.get_running_loop().create_task(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self, max_requests: int) -> list[_Waiting]:
        batch: list[_Waiting] = []
        n = 0
        while self._queue and len(batch) < max_requests:
            head = self._queue[0]
            if head.future.done():  # its caller went away
                self._queue.popleft()
                continue
            if n + len(head.texts) > self.max_texts:
                break
            batch.append(self._queue.popleft())
            n += len(head.texts)
        return batch

    async def _send(self) -> None:
        # Calls starting in the same turn split the queue between them: idle slots still run in
        # parallel (a few concurrent requests on an idle server are not serialised into one call).
        share = -(-len(self._queue) // self._starting)
        self._starting -= 1
        batch = self._take(share)
        if not batch:  # an earlier call took them all, or their callers went away
            self._inflight -= 1
            self._dispatch()
            return
        texts = [t for w in batch for t in w.texts]
        if self.on_call is not None:
            self.on_call(len(texts))
        try:
            results = await self.call(texts)
        except asyncio.CancelledError:  # the facade is stopping: so are its callers
            for w in batch:
                w.future.cancel()
            raise
        except Exception as e:  # every waiter gets the shared call's own error (e.g. 503, 504)
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(e)
        else:
            offset = 0
            for w in batch:
                if not w.future.done():
                    w.future.set_result(results[offset : offset + len(w.texts)])
                offset += len(w.texts)
        finally:
            self._inflight -= 1
        self._dispatch()  # not reached when cancelled: nothing more is sent while stopping
