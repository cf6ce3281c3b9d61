"""`fluxserve-bench swap --train-steps 2`: the real swap benchmark, end to end, in the foreground lane
(tests/run_suite.py): its worker publishes into build/'s exports beside the training-job tests',
which are in the foreground too, so the two never run at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import fluxserve_bench

pytestmark = pytest.mark.integration


def test_swap_benchmark_smoke(tmp_path: Path) -> None:
    """`fluxserve-bench swap` with 2-step jobs: the real worker trains, publishes and swaps, alone
    and while /generate runs; the result records the switch and no failed request. Without the
    side-by-side full re-export (a minute here): publishing with weight patching off is
    test_weight_patch's reference."""
    out = tmp_path / "swap.json"
    fluxserve_bench(
        "swap",
        *("--train-steps", "2", "--concurrency", "1", "--no-full-export"),
        *("--out", str(out), "--log-dir", str(tmp_path / "logs")),
        timeout_s=900,
    )
    result = json.loads(out.read_text())
    alone, loaded = result["alone"], result["under_load"]
    load = loaded["generate_load"]
    assert load["failed"] == 0 and load["versions_monotonic"] and load["requests_during_swap"] > 0
    # The idle job's version is what served when the loaded job began; that job replaced it.
    assert int(loaded["old_version"]) == int(alone["new_version"]) < int(loaded["new_version"])
    for job in (alone, loaded):
        assert job["training_steps"] == 2 and job["training_steps_per_s"] > 0
        # The new version serves once `generate` loaded; the publish goes on to load its streaming
        # twin, so serving can come before the publish's own end.
        assert 0 < job["post_to_job_id_ms"] and job["post_to_serving_s"] > 0 and job["publish_s"] > 0
    assert "| failed requests | 0 of" in out.with_suffix(".md").read_text()
