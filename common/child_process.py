"""What every long-lived child process the project starts shares: it dies with its parent."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` of a child process: Linux sends it SIGTERM when the process that started it
    dies, even by SIGKILL, so a parent killed outright leaves nothing behind (Triton and its stubs
    holding ports and shared memory, facade processes serving without their supervisor, `make up`'s
    training worker taking jobs with no stack around it). Best effort off glibc/Linux."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
