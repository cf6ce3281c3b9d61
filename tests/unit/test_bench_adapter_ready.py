"""fluxserve-bench adapter-ready's arithmetic and report (the run itself needs the real stack)."""

from __future__ import annotations

from benchmarks.adapter_ready import Generation, figures, render_markdown

LORA = {"name": "bench-ready", "sha256": "ab" * 32, "scale": 1.0}


def test_ready_is_succeeded_to_first_image_less_a_warm_generation() -> None:
    job = {"updated_unix": 1000.0, "result": {"publish": {"adapter": {"name": "bench-ready", "sha256": "ab" * 32}}}}
    first = Generation(done_unix=1003.5, inference_s=2.75, lora=LORA, model_version="3")
    warm = Generation(done_unix=1006.0, inference_s=2.25, lora=LORA, model_version="3")
    plain = Generation(done_unix=1008.0, inference_s=2.0, lora=None, model_version="3")
    got = figures(job, noticed_unix=1000.25, first=first, warm=warm, plain=plain)
    assert got["poll_lag_s"] == 0.25
    assert got["succeeded_to_first_image_s"] == 3.5
    assert got["first_image_over_warm_s"] == 0.5
    assert got["ready_s"] == 1.25
    assert got["model_version_unchanged"] is True and got["served_lora"] == LORA
    changed = figures(job, 1000.25, first, warm, Generation(1008.0, 2.0, None, "4"))
    assert changed["model_version_unchanged"] is False
    page = render_markdown({"started_utc": "2026-01-01 00:00 UTC", **got})
    assert "| **ready: `succeeded` → first image, less a warm generation** (goal ≤ 2 s) | 1.25 |" in page
    assert "`bench-ready`" in page
    assert page.startswith(
        "#### An adapter job to its first image (2026-01-01 00:00 UTC)"
    )  # dated for docs/benchmarks.md
