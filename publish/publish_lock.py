"""One publisher at a time: the locks a publish holds while it picks version numbers, writes
versions, loads them and commits.

* `repository_lock`: an fcntl lock on `<repo>/.fluxserve_publish.lock`. Every publisher on the
  machine (the worker, `fluxserve-export`, Triton's start-up cleanup) takes it; the kernel releases
  it when its holder dies, so a `kill -9` never leaves it stuck.
* `redis_lock`: with a Redis queue, workers on other machines publish into the same (shared)
  repository, where fcntl locks are not to be trusted: a Redis lock with a lease that a
  background thread renews while the holder lives, so a dead holder frees it within `lease_s`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = ".fluxserve_publish.lock"
POLL_S = 0.2


class PublishLockTimeout(TimeoutError):
    """Another publish held the lock for longer than the caller would wait."""


@contextmanager
def repository_lock(repo: Path, timeout_s: float = 3600.0) -> Iterator[None]:
    """Exclusive across processes on this machine; waits up to `timeout_s` (0: try once)."""
    repo.mkdir(parents=True, exist_ok=True)
    fd = os.open(repo / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PublishLockTimeout(
                        f"another publish holds the model repository lock (waited {timeout_s:.0f}s)"
                    ) from None
                time.sleep(POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def redis_lock(client: Any, key: str, timeout_s: float = 3600.0, lease_s: float = 30.0) -> Iterator[None]:
    """Exclusive across machines sharing one Redis (`client`: a redis.Redis)."""
    lock = client.lock(
        key, timeout=lease_s, sleep=POLL_S, blocking=True, blocking_timeout=timeout_s, thread_local=False
    )
    if not lock.acquire():
        raise PublishLockTimeout(f"another publish holds the Redis publish lock (waited {timeout_s:.0f}s)")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                lock.reacquire()
            except Exception:  # lost it (Redis down, lease expired): the publish goes on under the file lock
                log.exception("could not renew the Redis publish lock")
                return

    renewer = threading.Thread(target=renew, name="publish-lock-renew", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        try:
            lock.release()
        except Exception:
            log.warning("the Redis publish lock had already expired when released")
