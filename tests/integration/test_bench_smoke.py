"""`fluxserve-bench run --smoke`: the real benchmark command, end to end, for a few seconds.

Starts Triton, the facade and the baseline for real and drives ~20 requests per target. Asserts on
what the run produced (targets, request counts, Triton's own counters, finite ratios, files), never
on timings: this machine's speed is not a test outcome.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.paths import PROJECT_ROOT
from contract.specs import CLASSIFY, INLINE_ENCODER_PARAMETER
from export.triton_config import parse_config
from tests.integration.conftest import fluxserve_bench

pytestmark = pytest.mark.integration

CLASSIFY_TARGETS = ("facade-classify", "triton-classify", "baseline-classify")
SMOKE_REQUESTS = 20


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    if not (PROJECT_ROOT / "model_repository" / CLASSIFY.name / "config.pbtxt").exists():
        pytest.fail("classify is not built: run `make models` (make test does it)")
    out = tmp_path_factory.mktemp("bench")
    fluxserve_bench("run", "--smoke", "--out", str(out), "--log-dir", str(out / "logs"), timeout_s=600)
    return json.loads((out / "latest.json").read_text()), out


def test_every_classify_target_ran_its_requests_without_errors(smoke) -> None:
    result, _ = smoke
    for name in CLASSIFY_TARGETS:
        target = result["targets"][name]
        modes = {run["mode"] for run in target["runs"]}
        assert modes == {"closed", "open"}, (name, modes)
        for run in target["runs"]:
            assert run["sent"] == SMOKE_REQUESTS, (name, run)
            assert run["ok"] == SMOKE_REQUESTS and run["errors"] == 0, (name, run["error_samples"])
            assert run["dropped"] == 0
            assert 0 < run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"] <= run["max_ms"]


def test_triton_counted_exactly_the_measured_requests(smoke) -> None:
    result, _ = smoke
    config = parse_config((PROJECT_ROOT / "model_repository" / CLASSIFY.name / "config.pbtxt").read_text())
    inline = INLINE_ENCODER_PARAMETER in config.parameters  # the CPU default: no BLS to classifier_onnx
    for name in ("facade-classify", "triton-classify"):
        # Through the facade, a /readyz with no success in the last 10 s sends one probe text
        # (api/readiness.py): on a slow machine one may fall inside the measured window.
        probes = 1 if name == "facade-classify" else 0
        for run in result["targets"][name]["runs"]:
            classify, onnx = run["triton"]["classify"], run["triton"]["classifier_onnx"]
            assert SMOKE_REQUESTS <= classify["requests"] <= SMOKE_REQUESTS + probes, (name, run["triton"])
            assert classify["failures"] == 0, (name, run["triton"])
            # One text per request: the encoder saw every text once, in however many batches.
            encoder = classify if inline else onnx
            assert SMOKE_REQUESTS <= encoder["inferences"] <= SMOKE_REQUESTS + probes
            assert 1 <= encoder["executions"] <= SMOKE_REQUESTS + probes
            if inline:
                assert onnx["inferences"] == 0, (name, onnx)
            assert classify["avg_queue_us"] is not None and classify["avg_compute_infer_us"] > 0


def test_ratios_are_finite_and_the_baseline_is_one(smoke) -> None:
    result, _ = smoke
    for name in CLASSIFY_TARGETS:
        for run in result["targets"][name]["runs"]:
            for key in ("throughput_x", "p50_x", "p99_x"):
                value = run["vs_baseline"][key]
                assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, key, value)
                if name.startswith("baseline"):
                    assert value == pytest.approx(1.0)
            assert math.isfinite(run["of_ort_limit"]) and run["of_ort_limit"] > 0
    ort = result["ort_inprocess"]
    assert ort["best_texts_per_s"] > 0 and ort["best_batch_size"] in [r["batch_size"] for r in ort["sweep"]]
    head = result["headline"]["classify"]
    assert set(CLASSIFY_TARGETS) <= set(head["targets"])
    assert math.isfinite(head["facade_throughput_x_baseline"])


def test_environment_and_skips_are_recorded(smoke) -> None:
    result, _ = smoke
    env = result["environment"]
    assert env["cpu_count"] >= 1 and env["versions"]["onnxruntime"] and env["versions"]["tritonclient"]
    assert env["models"]["classifier"]["params"] > 1_000_000
    assert env["baseline"]["ready"] is True
    generate_built = (PROJECT_ROOT / "model_repository" / "generate" / "config.pbtxt").exists()
    for name in ("facade-generate", "triton-generate"):
        # Generate is measured when it is built, and otherwise skipped with a reason (never silently).
        assert (name in result["targets"]) == generate_built or name in result["skipped"]


def test_markdown_and_plots_are_written(smoke) -> None:
    result, out = smoke
    md = (out / "latest.md").read_text()
    for name in CLASSIFY_TARGETS:
        assert f"| {name} |" in md
    assert "ONNX Runtime limit" in md
    for plot in result["files"]["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {Path(p).name for p in result["files"]["plots"]} >= {"latency_classify.png", "throughput_classify.png"}


def test_generate_targets_when_built(smoke) -> None:
    result, _ = smoke
    measured = [n for n in result["targets"] if n.endswith("-generate")]
    if not measured:
        pytest.skip(f"generate not measured: {result['skipped']}")
    for name in measured:
        for run in result["targets"][name]["runs"]:
            assert run["errors"] == 0 and run["ok"] == run["sent"] > 0, (name, run["error_samples"])
    # The in-process limit ran on the served ONNX files, at 1 thread and at each generate concurrency.
    limit = result["flux_inprocess"]
    assert limit["best_images_per_s"] > 0 and {r["concurrency"] for r in limit["runs"]} >= {1}
