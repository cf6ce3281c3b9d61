"""The supervisor restarts a dead child with backoff and stops everything it started."""

from __future__ import annotations

import sys
import time

from runtime.supervisor import Backoff, ProcessChild, Supervisor


def test_backoff_grows_and_is_capped() -> None:
    b = Backoff(initial_s=1, max_s=10, factor=2)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 10]


def test_dead_child_is_restarted_and_stop_leaves_nothing() -> None:
    child = ProcessChild("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
    sup = Supervisor([child], Backoff(initial_s=0.1), poll_s=0.05)
    sup.start()
    try:
        first = child.process
        first.kill()  # a real kill -9, as an operator's accident would
        deadline = time.monotonic() + 30
        while sup.restarts["sleeper"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sup.restarts["sleeper"] == 1
        assert child.alive() and child.process.pid != first.pid
    finally:
        sup.stop(timeout_s=2)
    assert child.process.poll() is not None
