"""Goodput under a closed-loop storm through the real facade (issue 24).

Clients that retry at once (load balancers, wrk) must not turn load into an outage: the facade as
`make up` runs it serves, under 16x the concurrency that saturates /classify, most of what it
serves at that concurrency (the old facade served 2%: a collapse). Counts and ratios from one run,
no absolute timings; every refusal says when to come back, and nothing else fails. The figure
itself (over 90% here on a quiet machine) is the benchmark's, `fluxserve-bench goodput`
(docs/benchmarks.md): this test's bound leaves room for a busy CI machine, not for a collapse.
"""

from __future__ import annotations

import pytest
import uvloop

from benchmarks.goodput import GoodputSettings, storm
from contract.specs import CLASSIFY
from tests.conftest import start_facade

pytestmark = pytest.mark.integration

SATURATING = 16
STORM = 256
COLLAPSE_BOUND = 0.7
"""A shared 2-core machine under other load measured 86% here; the overloaded facade before issue 24, 2%."""


def test_closed_loop_storm_keeps_goodput(triton) -> None:
    facade = start_facade(triton.grpc_url, {"FLUXSERVE_API_REQUIRED_MODELS": '["classify"]'}, ready_path="/readyz")
    try:
        s = GoodputSettings(duration_s=5.0)
        uvloop.run(storm(CLASSIFY.name, facade.url, 2, GoodputSettings(duration_s=1.0)))  # warm-up
        capacity = uvloop.run(storm(CLASSIFY.name, facade.url, SATURATING, s))
        loaded = uvloop.run(storm(CLASSIFY.name, facade.url, STORM, s))
    finally:
        facade.stop()
    assert capacity["failed"] == 0 and loaded["failed"] == 0, (capacity, loaded)
    assert capacity["refused"] == 0, capacity  # saturating is not overload: nobody is refused
    assert loaded["refused_without_retry_after"] == 0
    assert loaded["ok_rps"] >= COLLAPSE_BOUND * capacity["ok_rps"], (capacity, loaded)
