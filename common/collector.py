"""The garbage collector's settings for processes that hold thousands of connections.

CPython's default thresholds (700, 10, 10) run a young collection every few hundred allocations
and a full one every few seconds; each full collection walks every live object (every open
connection's protocol, transport and buffers) while the event loop waits. Under a storm of
thousands of connections that stopped the facade's loop, and every request in flight with it; in
the load generator the same pauses read answers late and so added to the latencies it measured
(docs/benchmarks.md, "Under overload", has both).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

GC_THRESHOLDS = (20_000, 20, 20)
"""Fewer, larger collections spend a fraction of the time. Garbage with cycles waits longer to be
freed: a bounded amount, as each generation still runs every so many allocations."""


def freeze_startup_objects() -> None:
    """Leave what start-up made (modules, the app, the clients: objects that live as long as the
    process) out of the collector's full collections, and set GC_THRESHOLDS. For a serving process
    only: frozen objects are never freed, so not in a test process that opens many apps."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@contextmanager
def collector_tuned() -> Iterator[None]:
    """The same for the duration of a block (a load generator's run), then as before."""
    before = gc.get_threshold()
    freeze_startup_objects()
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
