"""File names and small readers for FLUX checkpoints and LoRAs, shared by export, training and the
`generate` model inside Triton (which must not import export/ or training/).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT_MARKER = "fluxserve_checkpoint.json"
"""Written last by export.flux.checkpoint.build_local_flux (so its presence means the build is
complete); holds the local build's T5 max_sequence_length."""
DEFAULT_MAX_SEQUENCE_LENGTH = 512
"""FLUX.1-dev's T5 context (FluxPipeline's default and maximum), for checkpoints without a marker."""

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""What FluxPipeline.save_lora_weights writes and load_lora_weights looks for by default."""
LORA_MANIFEST = "fluxserve_lora.json"
"""Beside a LoRA's weights: trigger word, training settings, provenance. Training writes it and
export reads it (write_lora_manifest / read_lora_manifest are the only pair that touch it)."""

LOOP_ASSETS: tuple[str, ...] = (
    "model_index.json",
    "scheduler",
    "tokenizer",
    "tokenizer_2",
    "transformer/config.json",
    "vae/config.json",
    CHECKPOINT_MARKER,
)
"""What the denoising loop (serving.flux_loop.FluxLoop) reads from a checkpoint: configs and
tokenizers, never weights."""


def read_max_sequence_length(checkpoint_dir: str | Path) -> int:
    """T5 tokens per prompt: the local build's marker value, else FLUX.1-dev's 512. Works on a full
    checkpoint or on a copy holding only its LOOP_ASSETS."""
    marker = Path(checkpoint_dir) / CHECKPOINT_MARKER
    if marker.exists():
        return int(json.loads(marker.read_text())["max_sequence_length"])
    return DEFAULT_MAX_SEQUENCE_LENGTH


def copy_loop_assets(checkpoint_dir: Path, dst: Path) -> Path:
    """Copy the configs and tokenizers the loop needs (no weights) into dst; returns dst."""
    checkpoint_dir, dst = Path(checkpoint_dir), Path(dst)
    for rel in LOOP_ASSETS:
        src = checkpoint_dir / rel
        if not src.exists():
            if rel == CHECKPOINT_MARKER:  # hub checkpoints have none: the loop falls back to 512
                continue
            raise FileNotFoundError(f"{src} is missing: not a diffusers FLUX checkpoint")
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target)
    return dst


def write_lora_manifest(lora_dir: Path, manifest: dict[str, Any]) -> Path:
    path = Path(lora_dir) / LORA_MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


def read_lora_manifest(lora: str | Path) -> dict[str, Any]:
    """The manifest beside a local LoRA (a directory, or a weights file in one); {} when there is none."""
    path = Path(lora)
    manifest = path / LORA_MANIFEST if path.is_dir() else path.parent / LORA_MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else {}
