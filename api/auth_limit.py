"""Failed operator-key attempts, limited per client: a token bucket of failures.

Each client (its IP address; an IPv6 client by its /64, which one machine usually holds whole)
may present `burst` wrong keys at once, and one more every `refill_s` seconds after that. A client
that has used them up is answered 429 with Retry-After *before its key is looked at*, so being
limited also stops guessing (checking the key and still refusing would tell a right guess from a
wrong one). A client limited this way cannot use a right key either until its bucket refills:
the price of not leaking which guess was right. One WARNING when a client becomes limited, not a
line per failure (a guessing client would otherwise write the log full).

Memory is bounded: buckets that have refilled are forgotten, and past `max_clients` the client
seen least recently goes first.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

IPV6_CLIENT_PREFIX = 64


@dataclass
class _Bucket:
    tokens: float
    updated: float
    warned: bool = False


def client_id(host: str | None) -> str:
    """The limiter's key for a client address: IPv4 as is, IPv6 by its /64, anything else as given."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))
    return str(address)


class FailedAuthLimiter:
    """`retry_after(client)` before checking a key, `failed(client)` after a wrong one."""

    def __init__(
        self,
        burst: int,
        refill_s: float,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.refill_s, self.max_clients, self._clock = burst, refill_s, max_clients, clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        return min(self.burst, bucket.tokens + (now - bucket.updated) / self.refill_s)

    def retry_after(self, client: str) -> float | None:
        """Seconds until `client` may present a key again; None when it may now."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return None
        tokens = self._refilled(bucket, self._clock())
        return None if tokens >= 1 else (1 - tokens) * self.refill_s

    def failed(self, client: str) -> None:
        """Record one wrong key from `client`."""
        now = self._clock()
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            self._make_room(now)
            bucket = _Bucket(tokens=float(self.burst), updated=now)
        bucket.tokens = self._refilled(bucket, now) - 1
        bucket.updated = now
        if bucket.tokens < 1 and not bucket.warned:
            bucket.warned = True
            log.warning(
                "client %s used up its %d wrong operator keys: refused with 429 until it slows to one every %g s",
                client,
                self.burst,
                self.refill_s,
            )
        elif bucket.tokens >= 1:
            bucket.warned = False
        self._buckets[client] = bucket  # most recently seen last

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_clients:
            return
        # A full bucket is the same as none: forget those first, then the least recently seen.
        for key in [k for k, b in self._buckets.items() if self._refilled(b, now) >= self.burst]:
            del self._buckets[key]
        while len(self._buckets) >= self.max_clients:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
