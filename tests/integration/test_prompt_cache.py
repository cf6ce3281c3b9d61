"""The prompt-embedding cache in `flux_prepare` on a real Triton, and its counters at the facade.

A repeated prompt must skip CLIP and T5 (seen as: the encoders' execution counts stay put, the
cache's hit counter moves) and give the same image. The facade's /metrics repeats the counters,
with the hit ratio, to the operator only (whether a prompt was seen before is nobody else's
business): checked in-process against a stand-in for Triton's metrics port
(tests/unit/facade/test_http_metrics.py, tests/unit/test_facade_security.py)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from client.triton_client import TritonClient
from contract.specs import FLUX_TEXT_ENCODER, FLUX_TEXT_ENCODER_2, PROMPT_CACHE_METRIC, GenerateParams
from tests.conftest import triton_metric

pytestmark = pytest.mark.integration

SMALL = {"width": 64, "height": 64, "steps": 2}


def cache_lookups(metrics_text: str, result: str) -> float:
    prefix = f'{PROMPT_CACHE_METRIC}{{result="{result}"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines() if line.startswith(prefix))


def test_repeated_prompt_skips_the_encoders_and_is_counted(triton) -> None:
    import httpx

    prompt = f"a lighthouse at dusk {uuid.uuid4().hex[:8]}"  # never seen by this server
    encoders = (FLUX_TEXT_ENCODER, FLUX_TEXT_ENCODER_2)

    def executions() -> dict[str, float]:
        return {m: triton_metric(triton.metrics_url, "nv_inference_exec_count", m) for m in encoders}

    def lookups() -> tuple[float, float]:
        text = httpx.get(triton.metrics_url, timeout=5).text
        return cache_lookups(text, "hit"), cache_lookups(text, "miss")

    with TritonClient(triton.grpc_url, timeout_s=300) as client:
        hits0, misses0 = lookups()
        first = client.generate(GenerateParams(prompt=prompt, seed=5, **SMALL)).image
        after_first = executions()
        hits1, misses1 = lookups()
        again = client.generate(GenerateParams(prompt=prompt, seed=6, **SMALL)).image  # same prompt, other seed
        same = client.generate(GenerateParams(prompt=prompt, seed=5, **SMALL)).image
        hits2, misses2 = lookups()
        after_repeat = executions()

    assert (hits1 - hits0, misses1 - misses0) == (0, 1)
    assert (hits2 - hits1, misses2 - misses1) == (2, 0)
    assert after_repeat == after_first, "a cached prompt still ran an encoder"
    assert np.array_equal(first, same), "a cache hit changed the image"
    assert not np.array_equal(first, again)
