"""The batching sweep's choice rule, and the export configs following its recommendation."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.sweep import Candidate, choose
from client.contract import CLASSIFY
from export.deployments import RECOMMENDATION_FILE, ExportSettings, classifier_deployments
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
    committed = json.loads(RECOMMENDATION_FILE.read_text())["classify"]
    assert _classify_batching(ExportSettings()) == (committed["max_queue_delay_us"], committed["preferred_batch_sizes"])
