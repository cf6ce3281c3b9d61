"""Triton's own view of a run: deltas of its Prometheus counters per model.

Triton's inference counters are cumulative (summed here over versions); the difference between a
scrape before and after a run splits each request's time inside Triton into queue (waiting for the
dynamic batcher / a free instance) and compute, and gives the average executed batch size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import httpx

log = logging.getLogger(__name__)

COUNTERS: tuple[str, ...] = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)

Snapshot = dict[tuple[str, str], float]


def parse_metrics(text: str, names: Iterable[str] = COUNTERS) -> Snapshot:
    """{(metric, model): value summed over versions} from Prometheus text format."""
    wanted = set(names)
    out: Snapshot = {}
    for line in text.splitlines():
        if not line.startswith("nv_") or "{" not in line:
            continue
        name, _, rest = line.partition("{")
        if name not in wanted:
            continue
        labels, _, value = rest.rpartition("}")
        model = next((p.split("=", 1)[1].strip('"') for p in labels.split(",") if p.startswith("model=")), None)
        if model is None:
            continue
        out[(name, model)] = out.get((name, model), 0.0) + float(value.strip().split()[0])
    return out


def scrape(metrics_url: str, timeout_s: float = 5.0) -> Snapshot:
    try:
        return parse_metrics(httpx.get(metrics_url, timeout=timeout_s).text)
    except httpx.HTTPError as e:
        log.warning("could not scrape %s: %s", metrics_url, e)
        return {}


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 3) if den > 0 else None


def model_deltas(before: Snapshot, after: Snapshot, models: Iterable[str]) -> dict[str, dict[str, float | None]]:
    """Per model: counter deltas and the per-request / per-execution averages derived from them."""
    out: dict[str, dict[str, float | None]] = {}
    for model in models:
        d = {name: after.get((name, model), 0.0) - before.get((name, model), 0.0) for name in COUNTERS}
        n = d["nv_inference_request_success"] + d["nv_inference_request_failure"]
        out[model] = {
            "requests": d["nv_inference_request_success"],
            "failures": d["nv_inference_request_failure"],
            "inferences": d["nv_inference_count"],
            "executions": d["nv_inference_exec_count"],
            "avg_batch": _ratio(d["nv_inference_count"], d["nv_inference_exec_count"]),
            "avg_request_us": _ratio(d["nv_inference_request_duration_us"], n),
            "avg_queue_us": _ratio(d["nv_inference_queue_duration_us"], n),
            "avg_compute_input_us": _ratio(d["nv_inference_compute_input_duration_us"], n),
            "avg_compute_infer_us": _ratio(d["nv_inference_compute_infer_duration_us"], n),
            "avg_compute_output_us": _ratio(d["nv_inference_compute_output_duration_us"], n),
        }
    return out
