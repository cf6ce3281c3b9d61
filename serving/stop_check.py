"""When a running generation should stop: its client cancelled it, or its deadline passed.

Checked before a request starts and after every denoising step, so abandoned work frees its
`generate` instance within a step instead of running to the end for nobody.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Stopped(Exception):
    """The request was cancelled or ran past its deadline; its loop stops here."""


def stop_check(
    is_cancelled: Callable[[], bool], timeout_us: int = 0, clock: Callable[[], float] = time.monotonic
) -> Callable[..., None]:
    """A callable (usable as FluxLoop's `on_step`) that raises Stopped when the work should end.
    `timeout_us` is the request's own timeout as Triton passes it (0: none)."""
    deadline = clock() + timeout_us / 1e6 if timeout_us > 0 else None

    def check(*_: object) -> None:
        if is_cancelled():
            raise Stopped("cancelled: the client is gone")
        if deadline is not None and clock() > deadline:
            raise Stopped(f"stopped at the request's deadline ({timeout_us / 1e6:g}s)")

    return check
