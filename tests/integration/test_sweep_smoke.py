"""`fluxserve-bench sweep`: the batching and instance-layout sweep, end to end, for a few seconds.

Its own Triton on a scratch copy of the classifier models; asserts on the recommendation it wrote
and on the configs the export renders from it, never on timings. It starts no shared server and
reads no shared build folder, so `make test` runs it in the background lane (tests/run_suite.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.specs import CLASSIFIER_ONNX, CLASSIFY
from tests.integration.conftest import fluxserve_bench

pytestmark = pytest.mark.integration


def test_sweep_smoke(tmp_path: Path) -> None:
    """`fluxserve-bench sweep` on two candidates and two layouts: a recommendation the export code
    then renders."""
    from export.deployments import ExportSettings, classifier_deployments
    from export.triton_config import render_config

    out = tmp_path / "rec.json"
    fluxserve_bench(
        "sweep",
        *("--candidates", "0", "2000:4,8", "--layouts", "2,1,2", "1,1,1"),
        *("--duration-s", "2", "--concurrency", "4", "--out", str(out), "--log-dir", str(tmp_path / "logs")),
        timeout_s=600,
    )
    rec = json.loads(out.read_text())
    assert set(rec["measured"]) == {"delay=0us preferred=[]", "delay=2000us preferred=[4, 8]"}
    for m in rec["measured"].values():
        assert m["errors"] == 0 and m["ok"] > 0 and m["classify_avg_batch"] >= 1
    chosen = (rec["classify"]["max_queue_delay_us"], rec["classify"]["preferred_batch_sizes"])
    assert chosen in [(0, []), (2000, [4, 8])]
    cfg = render_config(classifier_deployments(ExportSettings(batching_recommendation=out))[CLASSIFY.name], "cpu")
    assert (
        cfg.dynamic_batching.max_queue_delay_microseconds,
        list(cfg.dynamic_batching.preferred_batch_size),
    ) == chosen
    assert set(rec["measured_layouts"]) == {"classify x2 onnx x1 threads=2", "classify x1 onnx x1 threads=1"}
    layout = (
        rec["classify"]["instances"],
        rec["classifier_onnx"]["instances"],
        rec["classifier_onnx"]["intra_op_threads"],
    )
    assert layout in [(2, 1, 2), (1, 1, 1)]
    deps = classifier_deployments(ExportSettings(batching_recommendation=out))
    onnx = render_config(deps[CLASSIFIER_ONNX.name], "cpu")
    rendered = (
        render_config(deps[CLASSIFY.name], "cpu").instance_group[0].count,
        onnx.instance_group[0].count,
        int(onnx.parameters["intra_op_threads"].string_value),
    )
    assert rendered == layout
