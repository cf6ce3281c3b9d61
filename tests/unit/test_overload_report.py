"""The overload benchmark's markdown table (what docs/benchmarks.md gets)."""

from __future__ import annotations

from benchmarks.overload import generator_bound, render_markdown


def test_overload_table_has_one_row_per_load_point() -> None:
    point = {
        "multiplier": 10.0,
        "offered_rps": 65.0,
        "sent": 1950,
        "served": 300,
        "rejected": 1650,
        "failed": 0,
        "failed_by_kind": {},
        "rejected_without_retry_after": 0,
        "served_p50_ms": 900.0,
        "served_p99_ms": 4000.0,
        "p99_vs_lone": 12.5,
        "reject_p50_ms": 3.1,
        "reject_max_ms": 40.0,
        "lone_after_ms": 350.0,
        "lone_after_vs_lone": 1.1,
        "idle_after_s": 0.0,
        "abandoned_work_share": 0.02,
        "cores_busy": {"load_generator": 0.81, "facade": 0.95, "triton": 0.24},
    }
    result = {
        "endpoints": [
            {
                "model": "generate",
                "lone_ms": 320.0,
                "capacity_rps": 6.5,
                "points": [point, {**point, "multiplier": 2.0}],
            }
        ]
    }
    table = render_markdown(result).splitlines()
    assert len(table) == 2 + 2
    assert "| 10x |" in table[2] and "2.0%" in table[2] and "1650" in table[2]
    assert table[2].endswith("| 0.81 / 0.95 / 0.24 |")
    # A run with facade settings changed describes another service: the table says so above itself.
    changed = render_markdown({**result, "settings": {"facade_env": {"FLUXSERVE_API_WORKERS": "2"}}}).splitlines()
    assert "FLUXSERVE_API_WORKERS" in changed[0] and changed[2:] == table


def test_a_point_the_load_generator_could_not_offer_is_marked() -> None:
    """Latencies count from each arrival's scheduled time: where the generator ran late, or sent
    fewer than it was to, the row carries its backlog and says so."""
    point = {"multiplier": 20.0, "offered_rps": 100.0, "sent": 1500, "sender_late_p99_ms": 20.0}
    assert not generator_bound(point, duration_s=15)
    assert generator_bound({**point, "sender_late_p99_ms": 2216.0}, duration_s=15)
    assert generator_bound({**point, "sent": 1000}, duration_s=15)  # two thirds of the arrivals
    row = {
        **point,
        "generator_bound": True,
        "served": 1,
        "rejected": 2,
        "failed": 0,
        "served_p50_ms": 1.0,
        "served_p99_ms": 2.0,
        "p99_vs_lone": 1.0,
        "reject_p50_ms": 1.0,
        "reject_max_ms": 1.0,
        "lone_after_ms": 1.0,
        "lone_after_vs_lone": 1.0,
        "idle_after_s": 0.0,
        "abandoned_work_share": 0.0,
    }
    result = {"endpoints": [{"model": "classify", "lone_ms": 5.0, "capacity_rps": 5.0, "points": [row]}]}
    table = render_markdown(result).splitlines()
    assert "| 20x † |" in table[2] and table[-1].startswith("† The load generator could not offer this load")
    assert "†" not in render_markdown(
        {**result, "endpoints": [{**result["endpoints"][0], "points": [point | row | {"generator_bound": False}]}]}
    )


def test_recovery_table_has_every_fault() -> None:
    from benchmarks.recovery import render_markdown as recovery_table

    result = {
        "cold_start_s": 40.0,
        "kill_tritonserver": [{"noticed_s": 0.3, "ready_again_s": 35.2}, {"noticed_s": 0.2, "ready_again_s": 33.0}],
        "kill_transformer_stub": {"noticed_s": 1.1, "ready_again_s": 9.8},
        "kill_worker_restarted_s": 1.4,
    }
    table = recovery_table(result).splitlines()
    assert len(table) == 2 + 5
    assert "35.2" in table[2] and "33.0" in table[3] and "9.8" in table[4] and "1.4" in table[5]
