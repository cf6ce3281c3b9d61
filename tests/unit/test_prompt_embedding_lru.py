"""serving.prompt_cache (LRU by bytes) and the facade's reading of its Triton counters."""

from __future__ import annotations

import numpy as np
import pytest

from api.triton_metrics import HIT_RATIO_METRIC, prompt_cache_exposition
from contract.specs import PROMPT_CACHE_METRIC
from serving.prompt_cache import PromptEmbeddingCache


def test_hit_returns_the_stored_value_and_never_recomputes() -> None:
    cache = PromptEmbeddingCache(1 << 20)
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.arange(4, dtype=np.float32)

    a, hit_a = cache.get_or_compute(("clip", 1, "p"), compute)
    b, hit_b = cache.get_or_compute(("clip", 1, "p"), compute)
    assert (hit_a, hit_b) == (False, True) and len(calls) == 1 and np.array_equal(a, b)
    with pytest.raises(ValueError):
        b[0] = 7  # stored read-only: a caller cannot poison later hits
    _, hit_other_version = cache.get_or_compute(("clip", 2, "p"), compute)
    assert not hit_other_version and (cache.hits, cache.misses) == (1, 2)


def test_evicts_least_recently_used_by_bytes() -> None:
    one = np.zeros(256, dtype=np.float32)  # 1 KiB
    cache = PromptEmbeddingCache(2 * one.nbytes)
    cache.get_or_compute("a", lambda: one)
    cache.get_or_compute("b", lambda: one)
    cache.get_or_compute("a", lambda: one)  # "a" is now the most recent
    cache.get_or_compute("c", lambda: one)  # evicts "b"
    assert len(cache) == 2 and cache.nbytes == 2 * one.nbytes
    assert cache.get_or_compute("a", lambda: one)[1] and not cache.get_or_compute("b", lambda: one)[1]
    big = PromptEmbeddingCache(100)
    assert not big.get_or_compute("x", lambda: one)[1] and len(big) == 0  # larger than the cache: not kept


def test_exposition_repeats_the_counters_with_a_hit_ratio() -> None:
    triton_text = "\n".join(
        [
            "# HELP nv_inference_count x",
            "# TYPE nv_inference_count counter",
            'nv_inference_count{model="generate",version="1"} 9',
            f"# HELP {PROMPT_CACHE_METRIC} lookups",
            f"# TYPE {PROMPT_CACHE_METRIC} counter",
            f'{PROMPT_CACHE_METRIC}{{result="hit"}} 3',
            f'{PROMPT_CACHE_METRIC}{{result="miss"}} 1',
            "",
        ]
    )
    out = prompt_cache_exposition(triton_text)
    assert f'{PROMPT_CACHE_METRIC}{{result="hit"}} 3' in out and "nv_inference_count" not in out
    assert f"{HIT_RATIO_METRIC} 0.75" in out
    assert prompt_cache_exposition("# TYPE nv_inference_count counter\nnv_inference_count 1\n") == ""
