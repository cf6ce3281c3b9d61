"""Session fixtures shared by the FLUX unit tests: the tiny local checkpoint, its LoRA and the fused
pipeline. The builds are idempotent and live under pytest's base temp folder, so every module
reuses the first build."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.flux_assets import LORA_WEIGHT_NAME
from export.flux.checkpoint import build_local_flux
from export.flux.lora import build_local_lora, load_pipeline


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_local_flux(tmp_path_factory.getbasetemp() / "flux-tiny-0", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_lora(tiny_checkpoint: Path) -> Path:
    out = tiny_checkpoint.parent / "flux-tiny-0-lora"
    return out if (out / LORA_WEIGHT_NAME).exists() else build_local_lora(tiny_checkpoint, out)


@pytest.fixture(scope="session")
def fused_pipeline(tiny_checkpoint: Path, tiny_lora: Path):
    return load_pipeline(tiny_checkpoint, tiny_lora)
