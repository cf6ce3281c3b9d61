"""Goodput under a closed-loop storm through the real facade (issue 24).

Clients that retry at once (load balancers, wrk) must not turn load into an outage: the facade as
`make up` runs it serves, under 16x the concurrency that saturates /classify, at least 90% of what it
serves at that concurrency (the old facade served 2%: a collapse). Counts and ratios from one run,
no absolute timings. Driven twice: by wrk (C, the outside check; .ci/run installs Debian's), held to
the issue's 90%; and by the Python client, which also checks that every refusal says when to come
back and nothing else fails, but shares the 2 cores with the facade at 256 connections, so its bound
leaves room for its own cost (70%: a collapse still fails it). The figures themselves are
`fluxserve-bench goodput`'s (docs/benchmarks.md).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from benchmarks.goodput import GoodputSettings, run_wrk, storm, wrk_script
from contract.specs import CLASSIFY
from tests.conftest import Facade, start_facade

pytestmark = pytest.mark.integration

SATURATING = 16
STORM = 256
COLLAPSE_BOUND = 0.7
"""A shared 2-core machine under other load measured 86% here; the overloaded facade before issue 24, 2%."""


GOODPUT_BOUND = 0.9
"""Issue 24's bound, for the wrk-driven storm."""


@pytest.fixture(scope="module")
def classify_facade(triton) -> Iterator[Facade]:
    f = start_facade(triton.grpc_url, {"FLUXSERVE_API_REQUIRED_MODELS": '["classify"]'}, ready_path="/readyz")
    yield f
    f.stop()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (Debian: apt-get install wrk)")
def test_wrk_storm_keeps_goodput(classify_facade: Facade, tmp_path: Path) -> None:
    s = GoodputSettings(duration_s=5.0)
    script = tmp_path / "classify.lua"
    script.write_text(wrk_script(CLASSIFY.name, s))
    run_wrk(classify_facade.url, script, 2, GoodputSettings(duration_s=1.0))  # warm-up
    capacity = run_wrk(classify_facade.url, script, SATURATING, s)
    loaded = run_wrk(classify_facade.url, script, STORM, s)
    assert capacity["non_2xx"] == 0 and capacity["socket_errors"] == 0, capacity  # saturating is not overload
    assert loaded["socket_errors"] == 0, loaded
    assert loaded["ok_rps"] >= GOODPUT_BOUND * capacity["ok_rps"], (capacity, loaded)


def test_closed_loop_storm_keeps_goodput(classify_facade: Facade) -> None:
    s = GoodputSettings(duration_s=5.0)
    uvloop.run(storm(CLASSIFY.name, classify_facade.url, 2, GoodputSettings(duration_s=1.0)))  # warm-up
    capacity = uvloop.run(storm(CLASSIFY.name, classify_facade.url, SATURATING, s))
    loaded = uvloop.run(storm(CLASSIFY.name, classify_facade.url, STORM, s))
    assert capacity["failed"] == 0 and loaded["failed"] == 0, (capacity, loaded)
    assert capacity["refused"] == 0, capacity  # saturating is not overload: nobody is refused
    assert loaded["refused_without_retry_after"] == 0
    assert loaded["ok_rps"] >= COLLAPSE_BOUND * capacity["ok_rps"], (capacity, loaded)
