"""Integration fixtures for the second target: the default FLUX served by the gpu-torch target.

`torch_triton` publishes the checkpoint and LoRA the built repository's `generate` was exported
from with `--target gpu-torch` (PyTorch components in the python backend) into a scratch
repository, with the device set to the host (the same code a GPU runs; float32, so parity with
diffusers holds as tightly as on the CPU target), and starts a real Triton on it. `target_triton`
runs a test once per target: the cheap generate tests that show the public behaviours use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.specs import GENERATE
from publish.repository import versions
from tests.conftest import MODEL_REPOSITORY, PROJECT_ROOT, require_models, start_triton

TARGETS = ("cpu", "gpu-torch")
TORCH_ENV = {"FLUXSERVE_TORCH_DEVICE": "cpu", "FLUXSERVE_TORCH_DTYPE": "float32"}


def fluxserve_bench(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`fluxserve-bench <args>` as a user runs it (its own process, the project root, no hub), which
    must succeed; its output for the caller."""
    cmd = [sys.executable, "-m", "benchmarks.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def served_provenance(repo: Path = MODEL_REPOSITORY) -> dict:
    """What the newest `generate` of a repository was exported from (checkpoint, LoRA, scale, trigger)."""
    version = versions(repo, GENERATE.name)[-1]
    manifest = json.loads((repo / GENERATE.name / str(version) / "fluxserve_manifest.json").read_text())
    return manifest["provenance"]


def publish_torch(repo: Path, **kwargs: object) -> dict:
    """publish_flux for the gpu-torch target on the host (FLUXSERVE_TORCH_ set for the call only)."""
    from publish.flux import publish_flux

    saved = {k: os.environ.get(k) for k in TORCH_ENV}
    os.environ.update(TORCH_ENV)
    try:
        return publish_flux(repo, target="gpu-torch", **kwargs)  # type: ignore[arg-type]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def torch_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_models(GENERATE.name)
    prov = served_provenance()
    repo = tmp_path_factory.mktemp("gpu-torch-repo")
    publish_torch(
        repo,
        checkpoint=prov["checkpoint"],
        lora=prov["lora"],
        lora_scale=prov["lora_scale"],
        trigger_word=prov["trigger_word"],
    )
    return repo


@pytest.fixture(scope="session")
def torch_triton(torch_repo: Path) -> Iterator[object]:
    server = start_triton(torch_repo, log_name="test-triton-gpu-torch.log")
    yield server
    server.stop()


@pytest.fixture(scope="module", params=TARGETS)
def target_triton(request: pytest.FixtureRequest) -> object:
    """The running Triton of each target in turn (the built CPU repository, then gpu-torch)."""
    return request.getfixturevalue("triton" if request.param == "cpu" else "torch_triton")
