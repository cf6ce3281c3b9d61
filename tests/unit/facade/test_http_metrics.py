"""/metrics repeats the prompt cache's counters from Triton's metrics port, with the hit ratio, to
the operator only, and goes without them when Triton's port does not answer. In-process, with a
loopback HTTP server standing in for Triton's metrics port (what Triton exports there is checked
against a real Triton in tests/integration/test_prompt_cache.py). Moved here from that file's
facade test, which started two facade processes for it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from api.triton_metrics import HIT_RATIO_METRIC
from contract.specs import PROMPT_CACHE_METRIC
from runtime.processes import free_port

pytestmark = pytest.mark.anyio


def cache_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("fluxserve_prompt_cache", PROMPT_CACHE_METRIC))]


async def test_operator_metrics_carry_the_prompt_cache_and_its_hit_ratio(
    facade_with: Callable, triton_metrics_url: str
) -> None:
    async with facade_with(triton_metrics_url=triton_metrics_url) as f:
        operator = await f.http.get("/metrics")
        public = await f.anon.get("/metrics")
    assert operator.status_code == 200
    assert f'{PROMPT_CACHE_METRIC}{{result="hit"}} 3' in operator.text
    assert f'{PROMPT_CACHE_METRIC}{{result="miss"}} 1' in operator.text
    ratio = [line for line in operator.text.splitlines() if line.startswith(f"{HIT_RATIO_METRIC} ")]
    assert len(ratio) == 1 and float(ratio[0].split()[1]) == pytest.approx(0.75)
    assert "nv_inference_count" not in operator.text  # only the cache's family is repeated
    assert public.status_code == 200 and "fluxserve_http_requests_total" in public.text
    assert not cache_lines(public.text)


async def test_metrics_answer_without_the_cache_when_triton_is_silent(facade_with: Callable) -> None:
    async with facade_with(triton_metrics_url=f"http://127.0.0.1:{free_port()}/metrics") as f:
        r = await f.http.get("/metrics")
    assert r.status_code == 200 and "fluxserve_http_requests_total" in r.text
    assert PROMPT_CACHE_METRIC not in r.text and not cache_lines(r.text)
