"""fluxserve-bench adapter-mix: its report on made-up figures (the run itself is a benchmark)."""

from __future__ import annotations

from benchmarks.adapter_mix import render_markdown


def _point(clients: int, distinct: int, ips: float) -> dict:
    return {
        "clients": clients,
        "distinct_adapters": distinct,
        "images": 16,
        "wall_s": 16 / ips,
        "images_per_s": ips,
        "latency_median_s": 1.5,
        "inferences_per_execution": 2.5,
    }


def test_report_rates_each_point_against_the_run_without_adapters() -> None:
    result = {
        "started_utc": "2026-12-07 04:00 UTC",
        "settings": {"image_side": 128, "steps": 4, "requests_per_client": 4, "repeats": 2, "rank": 4},
        "background_load_at_start": {"cpu_busy_fraction": 0.01},
        "background_load_at_end": {"cpu_busy_fraction": 0.02},
        "points": [_point(4, 0, 2.0), _point(8, 0, 4.0), _point(4, 4, 1.8), _point(8, 8, 3.0)],
        "time_to_serve": {
            "publish_s": 0.2,
            "first_image_s": 1.1,
            "warm_image_s": 1.0,
            "no_adapter_image_s": 0.9,
            "publish_to_first_image_s": 1.3,
            "first_use_over_warm_s": 0.1,
        },
        "memory": {
            "transformer_instances": 2,
            "slot_bytes": 3 << 20,
            "adapter_slots": 7,
            "rank": 16,
            "layout": "grouped",
            "rss_no_adapter_bytes": [100 << 20, 110 << 20],
            "rss_adapters_loaded_bytes": [118 << 20, 129 << 20],
            "rss_slots_filled_bytes": [121 << 20, 131 << 20],
        },
    }
    text = render_markdown(result)
    assert "| 4 | 4 | 1.8 | 0.90× | 1.5 | 2.5 |" in text
    assert "| 8 | 8 | 3.0 | 0.75× |" in text
    assert "| 8 | 0 | 4.0 | 1.00× |" in text
    assert "publish to first image 1.3 s" in text
    assert "a bank slot holds 3.00 MiB" in text and "21.0 MiB when all are filled" in text
    assert "by 18.0, 19.0 MiB once every adapter had been loaded once, and by 21.0, 21.0 MiB after all" in text
