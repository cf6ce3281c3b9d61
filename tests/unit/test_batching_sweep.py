"""The batching sweep's choice rule, and the export configs following its recommendation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.sweep import Candidate, Layout, choose, choose_layout
from common.paths import RECOMMENDED_BATCHING_FILE
from contract.specs import CLASSIFIER_ONNX, CLASSIFY
from export.deployments import ExportSettings, classifier_deployments
from export.triton_config import render_config


def _m(rps: float, p99: float, errors: int = 0) -> dict:
    return {"throughput_rps": rps, "p99_ms": p99, "errors": errors}


def test_highest_throughput_wins() -> None:
    assert choose({Candidate(0): _m(400, 50), Candidate(2000, (8, 16)): _m(560, 90)}, 0.03) == Candidate(2000, (8, 16))


def test_ties_go_to_the_shortest_delay_then_the_lowest_p99() -> None:
    measured = {
        Candidate(5000, (16, 32)): _m(576, 80),
        Candidate(2000, (8, 16, 32)): _m(565, 95),
        Candidate(2000): _m(562, 85),
        Candidate(0): _m(450, 60),
    }
    assert choose(measured, 0.03) == Candidate(2000)
    assert choose(measured, 0.0) == Candidate(5000, (16, 32))


def test_erroring_candidates_lose() -> None:
    assert choose({Candidate(0): _m(400, 50), Candidate(500): _m(900, 20, errors=3)}, 0.03) == Candidate(0)


def test_candidate_syntax() -> None:
    assert Candidate.parse("2000:8,16,32") == Candidate(2000, (8, 16, 32))
    assert Candidate.parse("500") == Candidate(500)


def _classify_batching(settings: ExportSettings) -> tuple[int, list[int]]:
    cfg = render_config(classifier_deployments(settings)[CLASSIFY.name], "cpu")
    return cfg.dynamic_batching.max_queue_delay_microseconds, list(cfg.dynamic_batching.preferred_batch_size)


def test_generated_config_follows_the_recommendation(tmp_path: Path) -> None:
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps({"classify": {"max_queue_delay_us": 1234, "preferred_batch_sizes": [4, 8]}}))
    assert _classify_batching(ExportSettings(batching_recommendation=rec)) == (1234, [4, 8])
    # Explicit settings (FLUXSERVE_EXPORT_CLASSIFY_*) win over the measurement.
    assert _classify_batching(
        ExportSettings(
            batching_recommendation=rec, classify_max_queue_delay_us=100, classify_preferred_batch_sizes=(2,)
        )
    ) == (100, [2])
    assert _classify_batching(ExportSettings(batching_recommendation=tmp_path / "none.json")) == (2000, [])


def test_the_committed_recommendation_is_the_default() -> None:
    committed = json.loads(RECOMMENDED_BATCHING_FILE.read_text())["classify"]
    assert _classify_batching(ExportSettings()) == (committed["max_queue_delay_us"], committed["preferred_batch_sizes"])


def _mc(rps: float, cpu_ms: float, p99: float = 50.0) -> dict:
    return {"throughput_rps": rps, "p99_ms": p99, "errors": 0, "cpu_ms_per_request": cpu_ms}


def test_layout_ties_go_to_the_least_cpu_per_request() -> None:
    a, b, c = (Candidate(0, (), Layout.parse(t)) for t in ("2,1,2", "1,1,2", "2,2,1"))
    measured = {a: _mc(560, 3.4), b: _mc(550, 3.0), c: _mc(500, 2.5)}
    assert choose_layout(measured, 0.03) == b
    assert choose_layout(measured, 0.0) == a


def test_layout_syntax() -> None:
    assert Layout.parse("2,1,2") == Layout(2, 1, 2)
    with pytest.raises(ValueError):
        Layout.parse("0,1,2")


def _layout(settings: ExportSettings) -> tuple[int, int, str]:
    deps = classifier_deployments(settings)
    onnx = render_config(deps[CLASSIFIER_ONNX.name], "cpu")
    return (
        render_config(deps[CLASSIFY.name], "cpu").instance_group[0].count,
        onnx.instance_group[0].count,
        onnx.parameters["intra_op_threads"].string_value,
    )


def test_generated_layout_follows_the_recommendation(tmp_path: Path) -> None:
    rec = tmp_path / "rec.json"
    rec.write_text(
        json.dumps({"classify": {"instances": 3}, "classifier_onnx": {"instances": 2, "intra_op_threads": 1}})
    )
    assert _layout(ExportSettings(batching_recommendation=rec)) == (3, 2, "1")
    assert _layout(ExportSettings(batching_recommendation=rec, classifier_onnx_threads=4)) == (3, 2, "4")
    assert _layout(ExportSettings(batching_recommendation=tmp_path / "none.json")) == (2, 1, "2")
