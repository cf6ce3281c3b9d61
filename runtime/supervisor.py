"""Keep `make up`'s children alive: restart Triton and the training worker when either dies.

A watcher thread polls each child; a dead one is restarted after an exponential backoff (reset
once the child has stayed up for `stable_s`), and every death and restart is logged. Triton is
started again from the model repository, so it serves the committed model versions; the facade
stays up meanwhile, answering 503 + Retry-After, and its gRPC channel reconnects by itself.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common.child_process import die_with_parent
from runtime.launcher import PROJECT_ROOT, TritonServer, TritonStartError

log = logging.getLogger("fluxserve.supervisor")


class Child(Protocol):
    name: str

    def alive(self) -> bool: ...
    def exit_code(self) -> int | None: ...
    def start(self) -> None: ...
    def stop(self, timeout_s: float) -> None: ...


@dataclass
class Backoff:
    initial_s: float = 1.0
    max_s: float = 30.0
    factor: float = 2.0
    stable_s: float = 60.0
    """A child up this long counts as healthy again: its next death restarts after initial_s."""

    def delay(self, restarts_in_a_row: int) -> float:
        return min(self.max_s, self.initial_s * self.factor ** max(0, restarts_in_a_row - 1))


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a child's whole process group (Triton's python stubs, the worker's threads)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class TritonChild:
    """Triton under supervision. A restart first kills what the dead server left behind (its
    python stub processes share its process group) and then starts it from the repository."""

    name = "triton"

    def __init__(self, server: TritonServer) -> None:
        self.server = server
        self._last_pid: int | None = None
        self._last_code: int | None = None

    def alive(self) -> bool:
        proc = self.server.process
        if proc is None:
            return False
        code = proc.poll()
        if code is not None:
            self._last_code = code
        return code is None

    def exit_code(self) -> int | None:
        return self._last_code

    def start(self) -> None:
        if self.server.process is not None:
            kill_group(self.server.process.pid)
            self.server.process.wait()
            self.server.process = None
        self.server.start()
        self._last_pid = self.server.process.pid if self.server.process else None

    def stop(self, timeout_s: float) -> None:
        pid = self.server.process.pid if self.server.process else None
        self.server.stop(timeout_s)
        if pid is not None:
            kill_group(pid)  # stubs that outlived their server


class ProcessChild:
    """A plain child process (the training worker), in its own process group."""

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str] | None = None, log_path: Path | None = None
    ) -> None:
        self.name, self.argv, self.env, self.log_path = name, argv, dict(env or {}), log_path
        self.process: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def start(self) -> None:
        out = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = self.log_path.open("ab")
        try:
            # Its own session: Ctrl-C reaches only the stack, which stops children in order. A
            # stack killed outright (kill -9) takes the child with it instead of orphaning it.
            self.process = subprocess.Popen(
                self.argv,
                cwd=PROJECT_ROOT,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            if out is not None:
                out.close()

    def stop(self, timeout_s: float) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", self.name, timeout_s)
        kill_group(proc.pid)
        proc.wait()


def worker_child(env: Mapping[str, str] | None = None, log_path: Path | None = None) -> ProcessChild:
    return ProcessChild("training worker", [sys.executable, "-m", "training.worker"], env, log_path)


class Supervisor:
    """Starts children in order, restarts any that dies, stops them all."""

    def __init__(self, children: list[Child], backoff: Backoff | None = None, poll_s: float = 0.5) -> None:
        self.children, self.backoff, self.poll_s = children, backoff or Backoff(), poll_s
        self.restarts: dict[str, int] = {c.name: 0 for c in children}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> None:
        for child in self.children:
            child.start()
        self._thread.start()

    def _watch(self) -> None:
        in_a_row = {c.name: 0 for c in self.children}
        up_since = {c.name: time.monotonic() for c in self.children}
        while not self._stop.wait(self.poll_s):
            for child in self.children:
                if self._stop.is_set() or child.alive():
                    continue
                if time.monotonic() - up_since[child.name] >= self.backoff.stable_s:
                    in_a_row[child.name] = 0
                in_a_row[child.name] += 1
                delay = self.backoff.delay(in_a_row[child.name])
                log.warning(
                    "%s died (exit code %s); restarting in %.1fs (attempt %d)",
                    child.name,
                    child.exit_code(),
                    delay,
                    in_a_row[child.name],
                )
                if self._stop.wait(delay):
                    return
                started = time.monotonic()
                try:
                    child.start()
                except (TritonStartError, OSError) as e:
                    log.error("restarting %s failed: %s", child.name, e)
                    continue
                self.restarts[child.name] += 1
                up_since[child.name] = time.monotonic()
                log.warning(
                    "%s restarted in %.1fs (restart #%d)",
                    child.name,
                    time.monotonic() - started,
                    self.restarts[child.name],
                )

    def stop(self, timeout_s: float = 3.0) -> None:
        """Stop watching, then stop every child at once (each gets `timeout_s`, then is killed),
        so stopping takes about `timeout_s` however many children there are."""
        self._stop.set()
        if self._thread.is_alive():
            # A restart in progress may block in Triton's start; stopping the child ends it.
            self._thread.join(timeout=1.0)
        stoppers = [
            threading.Thread(target=child.stop, args=(timeout_s,), name=f"stop {child.name}") for child in self.children
        ]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
