"""The CPU ceiling under `make bench`'s classify tables: arithmetic on the run's own counters."""

from __future__ import annotations

from benchmarks.report import _cpu_ceiling


def _run(total_ms: float, onnx_ms: float, classify_ms: float = 0.0) -> dict:
    return {
        "mode": "closed",
        "concurrency": 32,
        "cpu": {
            "total_cpu_ms_per_request": total_ms,
            "cores": 2,
            "cpu_ms_per_request": {"triton:classifier_onnx": onnx_ms, "triton:classify": classify_ms},
        },
    }


def test_the_ceiling_is_cores_over_cpu_per_request_against_the_limit() -> None:
    result = {
        "ort_inprocess": {"best_texts_per_s": 1250.0},
        "headline": {"classify": {"concurrency": 32}},
        "targets": {
            "facade-classify": {"door": "facade", "model": "classify", "runs": [_run(2.0, 1.2, 0.1)]},
            "triton-classify": {"door": "triton", "model": "classify", "runs": [_run(2.0, 0.0, 1.4)]},
            "baseline-classify": {"door": "baseline", "model": "classify", "runs": [_run(10.0, 0.0)]},
        },
    }
    lines = _cpu_ceiling(result, "classify")
    assert len(lines) == 3  # heading + 2 doors; the baseline has no share of the limit to cap
    # 2 cores / 2.0 ms = 1,000 req/s = 80% of 1,250; 85% of 1,250 leaves 2000 / 1062.5 = 1.88 ms.
    assert "caps it at 1,000 req/s, **80%** of the limit" in lines[1]
    assert "(1.30 of them in `classify` + `classifier_onnx`, tokenizing and encoding)" in lines[1]
    # Encoder inline in `classify` (classifier_onnx idle): only the process that did the work is named.
    assert "(1.40 of them in `classify`, tokenizing and encoding)" in lines[2]
    assert "85% 1.88 ms, 90% 1.78 ms" in lines[1]


def test_no_ceiling_without_an_in_process_limit() -> None:
    result = {"headline": {"classify": {"concurrency": 32}}, "targets": {}}
    assert _cpu_ceiling(result, "classify") == []
