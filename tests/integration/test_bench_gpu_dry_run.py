"""`fluxserve-bench gpu --dry-run`: the GPU check's every phase, on CPU with the tiny model.

The same command that measures an H100 (build, publish for gpu-torch, one Triton start, per
config the in-process pipeline, a Triton reload with that config, warm-up and 1/2/4-client load,
then the quality check and the result files) runs here in about a minute. Asserts on what the run
produced, never on timings: every phase ran and timed itself, every load point answered every
request, the lossless compiled config equals bf16, and Triton's images are the in-process
pipeline's (a wrong served pipeline differs by tens of levels).
"""

from __future__ import annotations

import json

import pytest

from benchmarks.gpu import CONFIGS
from tests.integration.conftest import fluxserve_bench

pytestmark = pytest.mark.integration

CONFIG_NAMES = ("bf16", "bf16-compile", "fp8-compile")
CLIENTS = (1, 2, 4)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench-gpu")
    args = ("gpu", "--dry-run", "--out", str(out), "--work-dir", str(out / "w"), "--configs", *CONFIG_NAMES)
    proc = fluxserve_bench(*args, timeout_s=900)
    return json.loads((out / "gpu-cpu-dry-run.json").read_text()), proc.stdout


def test_every_phase_ran_and_says_how_long_it_took(dry_run) -> None:
    result, stdout = dry_run
    phases = {p["phase"]: p for p in result["phases"]}
    expected = ["environment", "build", "publish", "triton-start", "inprocess-encoders"]
    for name in CONFIG_NAMES:
        expected += [f"inprocess:{name}", f"triton-load:{name}", f"triton-warmup:{name}", f"triton-load-points:{name}"]
    assert list(phases) == expected
    for name, phase in phases.items():
        assert phase["status"] == "ok", phase
        assert phase["seconds"] >= 0
        assert f"| {name} | ok | {phase['seconds']} |" in stdout  # the printed table carries every phase's time
    assert result["dry_run"] is True and result["total_seconds"] > 0


def test_every_config_served_every_load_point(dry_run) -> None:
    result, _ = dry_run
    for name in CONFIG_NAMES:
        config = result["configs"][name]
        assert "error" not in config, config.get("error")
        assert config["runtime"] == CONFIGS[name]
        assert config["inprocess"]["s_per_image"] > 0 and config["inprocess"]["latents_finite"]
        points = config["triton"]["points"]
        assert [p["clients"] for p in points] == list(CLIENTS)
        for p in points:
            assert p["errors"] == [] and p["images"] == max(p["clients"], 1), p
            assert p["images_per_s"] > 0
    summary = result["summary"]
    assert summary["fastest_lossless"] in ("bf16", "bf16-compile") and summary["goal_met"] is None


def test_quality_is_measured_against_bf16_and_against_in_process(dry_run) -> None:
    result, _ = dry_run
    quality = result["quality"]
    compiled = quality["vs_bf16"]["bf16-compile"]
    assert compiled["within_bound"]  # compile and fused q/k/v are lossless
    fp8 = quality["vs_bf16"]["fp8-compile"]
    assert 0 < max(fp8["latent_relative_error"]) < 1  # measured, and not noise
    for name in CONFIG_NAMES:
        for m in quality["triton_vs_inprocess"][name]:
            # The served loop (numpy Euler steps in fp32) against diffusers' (bf16 latents).
            assert m["mean_abs_pixel_diff"] <= 4.0, (name, m)
