"""The supervisor restarts a dead child with backoff and stops everything it started."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

from common.paths import PROJECT_ROOT
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


def test_a_child_does_not_outlive_a_stack_killed_outright(tmp_path: Path) -> None:
    """`make up` killed with kill -9 has no chance to stop its children: the training worker must
    end with it, not stay behind taking jobs (seen before the fix: orphaned workers)."""
    script = (
        "import os, signal, sys\n"
        "from runtime.supervisor import ProcessChild\n"
        "from pathlib import Path\n"
        "child = ProcessChild('sleeper', [sys.executable, '-c', 'import time; time.sleep(600)'],\n"
        f"                     log_path=Path({str(tmp_path / 'child.log')!r}))\n"
        "child.start()\n"
        "print(child.process.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    orphan = int(proc.stdout.split()[0])
    try:
        psutil.Process(orphan).wait(timeout=30)  # returns once it is gone (reaped by whoever adopted it)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        psutil.Process(orphan).kill()
        raise AssertionError("the child outlived its killed parent") from None
