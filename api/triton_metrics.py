"""The prompt-embedding cache's counters, read from Triton's metrics port for the facade's /metrics.

The cache lives in Triton's `flux_prepare` model (serving.prompt_cache), which counts its
lookups with Triton's custom metrics API; a python model cannot reach the facade's registry.
At scrape time the facade reads Triton's exposition (one bounded GET) and repeats that family,
adding the hit ratio; when Triton does not answer, /metrics simply goes without them.
"""

from __future__ import annotations

import logging

import httpx
from prometheus_client.parser import text_string_to_metric_families

from contract.specs import PROMPT_CACHE_METRIC

log = logging.getLogger(__name__)

HIT_RATIO_METRIC = "fluxserve_prompt_cache_hit_ratio"


def prompt_cache_exposition(triton_metrics_text: str) -> str:
    """The prompt cache's lines of Triton's metrics text, plus the hit ratio (empty if absent)."""
    counts: dict[str, float] = {}
    base = PROMPT_CACHE_METRIC.removesuffix("_total")
    for family in text_string_to_metric_families(triton_metrics_text):
        if family.name != base:
            continue
        for sample in family.samples:
            if sample.name == PROMPT_CACHE_METRIC:
                result = sample.labels.get("result", "")
                counts[result] = counts.get(result, 0.0) + sample.value
    if not counts:
        return ""
    hits, misses = counts.get("hit", 0.0), counts.get("miss", 0.0)
    lines = [
        f"# HELP {PROMPT_CACHE_METRIC} Prompt-embedding cache lookups in Triton's flux_prepare (a hit skips CLIP and T5)",
        f"# TYPE {PROMPT_CACHE_METRIC} counter",
        *(f'{PROMPT_CACHE_METRIC}{{result="{r}"}} {v:g}' for r, v in sorted(counts.items())),
        f"# HELP {HIT_RATIO_METRIC} Prompt-embedding cache hits / lookups since flux_prepare started",
        f"# TYPE {HIT_RATIO_METRIC} gauge",
        f"{HIT_RATIO_METRIC} {hits / (hits + misses) if hits + misses else 0.0:g}",
    ]
    return "\n".join(lines) + "\n"


async def fetch_prompt_cache_metrics(url: str | None, timeout_s: float) -> str:
    if not url:
        return ""
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(url)
            response.raise_for_status()
    except httpx.HTTPError as e:
        log.debug("Triton metrics unavailable (%s): /metrics goes without the prompt cache", e)
        return ""
    return prompt_cache_exposition(response.text)
