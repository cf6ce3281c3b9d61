"""`fluxserve-train defaults --target gpu-torch`: the one command that builds what a GPU machine serves.

The classifier's training and export are stood in for (they are tested elsewhere); the FLUX export
runs for real on the tiny local checkpoint, so what is checked is what the command wrote: the
gpu-torch repository (PyTorch component configs, the transformer LoRA in the pipeline versions),
and the classifier published as on the cpu target. `--target cpu` takes the ONNX path instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import export.flux_build as flux_build  # noqa: E402
import publish.classifier as publish_classifier  # noqa: E402
import training.cli as cli  # noqa: E402
from common.torch_runtime import RUNTIME_PARAMETER, TORCH_RUNTIME  # noqa: E402
from contract.specs import CLASSIFIER_ONNX, CLASSIFY, FLUX_COMPONENTS, FUSED_LORA_FILE, GENERATE  # noqa: E402
from export.triton_config import parse_config  # noqa: E402
from publish.flux import deployed_target  # noqa: E402
from publish.repository import Published, versions  # noqa: E402

pytestmark = pytest.mark.slow


class OnnxPath(Exception):
    """The cpu/gpu targets' ONNX export was chosen (stopped here: it is the expensive one)."""


@pytest.fixture
def stood_in(monkeypatch, tmp_path: Path, tiny_checkpoint: Path, tiny_lora: Path) -> list[tuple[Path, str]]:
    """The classifier's training and publish replaced by recorders; FLUX from the tiny build."""
    published: list[tuple[Path, str]] = []
    monkeypatch.setattr(cli, "is_up_to_date", lambda settings: True)
    monkeypatch.setattr(cli, "train_classifier", lambda settings: pytest.fail("the classifier is up to date"))

    def record(model_dir: Path, repo: Path, target: str, force: bool) -> dict[str, Published]:
        published.append((repo, target))
        return {n: Published(n, 1, repo / n / "1", created=False) for n in (CLASSIFIER_ONNX.name, CLASSIFY.name)}

    monkeypatch.setattr(publish_classifier, "publish_classifier", record)
    monkeypatch.setattr(flux_build, "default_checkpoint", lambda settings=None: tiny_checkpoint)
    monkeypatch.setattr(flux_build, "default_lora", lambda settings=None: tiny_lora)
    monkeypatch.setenv("FLUXSERVE_FLUX_BUILD_DIR", str(tmp_path / "build"))
    return published


def test_defaults_for_gpu_torch_publishes_the_torch_components(tmp_path: Path, stood_in, monkeypatch) -> None:
    def no_onnx(*args, **kwargs):
        raise OnnxPath

    monkeypatch.setattr(flux_build, "_onnx_parts", no_onnx)
    repo = tmp_path / "repo"
    assert cli.main(["defaults", "--repo", str(repo), "--target", "gpu-torch"]) == 0
    assert stood_in[0] == (repo, "cpu")  # gpu-torch serves the classifier as cpu does
    assert deployed_target(repo) == "gpu-torch"
    for name in FLUX_COMPONENTS:
        config = parse_config((repo / name / "config.pbtxt").read_text())
        assert config.parameters[RUNTIME_PARAMETER].string_value == TORCH_RUNTIME, name
    assert (repo / GENERATE.name / "1" / FUSED_LORA_FILE).exists()
    manifest = json.loads((repo / GENERATE.name / "1" / "fluxserve_manifest.json").read_text())
    assert manifest["target"] == "gpu-torch"
    # `make models` (no --target) afterwards keeps the repository's target: nothing new is written.
    assert cli.main(["defaults", "--repo", str(repo)]) == 0
    assert deployed_target(repo) == "gpu-torch" and versions(repo, GENERATE.name) == [1]


def test_defaults_for_cpu_takes_the_onnx_path(tmp_path: Path, stood_in, monkeypatch) -> None:
    def onnx(*args, **kwargs):
        raise OnnxPath

    monkeypatch.setattr(flux_build, "_onnx_parts", onnx)
    with pytest.raises(OnnxPath):
        cli.main(["defaults", "--repo", str(tmp_path / "repo"), "--target", "cpu"])
    assert stood_in == [(tmp_path / "repo", "cpu")]
