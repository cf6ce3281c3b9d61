"""The gpu-torch target's FLUX component versions: checkpoint folders and LoRA factors, no export step.

A component version holds the checkpoint's own folder for it (`module/`, hard links made by
publish). A LoRA becomes its low-rank factors per Linear layer, read with diffusers' loader and
folded alphas (export.flux.lora_deltas.layer_deltas, the CPU target's patch reader, so Kohya /
ai-toolkit / PEFT files mean the same on both targets) and checked against the module's structure
(built on the meta device: no memory). The transformer's factors go into the `generate` /
`generate_stream` versions (contract.specs.FUSED_LORA_FILE), and the running transformer patches
them into its weights in place when a call names them (serving/torch_lora.py): its own version
stays the base's, so a LoRA swap loads no transformer. CLIP's factors stay in its version
(`lora.safetensors`) and are added at load. A LoRA publish therefore writes megabytes, links the
base weights, and never traces or saves a transformer. A LoRA the factors cannot express (bias or DoRA terms, layers the module lacks) is
fused with diffusers and the component saved whole instead, as the CPU target re-exports it.
With the adapter branch (FLUXSERVE_FLUX_ADAPTER_BRANCH) the transformer's version also ships the
bank layout (`adapter_bank.json`, adapter_bank_file): the same as the CPU export's, computed from the
module's structure; serving/torch_adapters.py serves the branch from it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.torch_runtime import LORA_FILE, MODULE_CLASSES, MODULE_DIR, LoraFactors, save_lora_factors
from contract.specs import FLUX_COMPONENTS, FLUX_PIPELINE_SLOTS, FLUX_TRANSFORMER, FUSED_LORA_FILE
from export.fingerprints import fingerprint
from export.flux.settings import FluxSettings

log = logging.getLogger(__name__)

TORCH_LAYOUT = 1
"""Provenance of every torch component version: bump when the version folder's layout changes."""
BUILD_MARKER = "torch_build.json"
"""Written last into a build folder (LoRA factors or a fused module): its presence means complete."""


@dataclass(frozen=True)
class TorchComponentBuild:
    files: dict[str, Path]
    """Relative name in the version -> source file (publish hard-links them)."""
    provenance: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    pipeline_files: dict[str, Path] = field(default_factory=dict)
    """Files for every `generate` / `generate_stream` version pinning this build: the transformer
    LoRA's factors (contract.specs.FUSED_LORA_FILE), which the running transformer patches in."""


def checkpoint_folder(checkpoint: str | Path) -> Path:
    """A local checkpoint as it is; a hub id's snapshot of the four component folders and the
    loop's configs and tokenizers (needs a hub or a warm cache)."""
    if Path(str(checkpoint)).exists():
        return Path(checkpoint)
    from huggingface_hub import snapshot_download

    slots = [f"{slot}/*" for slot in FLUX_PIPELINE_SLOTS.values()]
    return Path(snapshot_download(str(checkpoint), allow_patterns=["*.json", "tokenizer*/*", "scheduler/*", *slots]))


def meta_module(slot: str, folder: Path) -> torch.nn.Module:
    """The component's structure from its config.json, on the meta device (no weights, no memory)."""
    import importlib

    package, name = MODULE_CLASSES[slot]
    cls = getattr(importlib.import_module(package), name)
    with torch.device("meta"):
        if hasattr(cls, "config_class"):  # transformers
            return cls(cls.config_class.from_pretrained(folder))
        return cls.from_config(cls.load_config(folder))


def lora_factors(
    state: dict[str, torch.Tensor],
    alphas: dict[str, Any],
    metadata: dict,
    slot: str,
    lora_scale: float,
    structure: torch.nn.Module,
) -> LoraFactors:
    """The LoRA's factors for one component, keyed by the module's own layer paths. Raises
    export.flux.lora_deltas.NotPatchable when a key is not a low-rank update of a Linear layer
    of `structure` with matching shapes."""
    from export.flux.lora_deltas import NotPatchable, layer_deltas

    modules = dict(structure.named_modules())
    out: LoraFactors = {}
    for path, delta in layer_deltas(state, alphas, metadata, f"{slot}.", lora_scale).items():
        # CLIP LoRAs name `text_model.encoder...`; transformers 5's CLIPTextModel has no wrapper.
        resolved = path if path in modules else path.removeprefix("text_model.")
        layer = modules.get(resolved)
        if not isinstance(layer, torch.nn.Linear):
            raise NotPatchable(f"{slot}.{path}: no Linear layer of that name in {type(structure).__name__}")
        rank = delta.down.shape[0]
        if tuple(delta.down.shape) != (rank, layer.in_features) or tuple(delta.up.shape) != (layer.out_features, rank):
            raise NotPatchable(
                f"{slot}.{path}: LoRA {tuple(delta.up.shape)} x {tuple(delta.down.shape)} does not fit "
                f"Linear({layer.in_features}, {layer.out_features})"
            )
        out[resolved] = (delta.down, delta.up, delta.scale)
    return out


def adapter_bank_file(checkpoint: str | Path, branch: Mapping[str, Any], settings: FluxSettings) -> tuple[str, Path]:
    """(name in the transformer's version, file) of the adapter branch's bank layout for `branch`
    (export.flux_build.adapter_branch: rank, layout, base fingerprint): the layers a LoRA may target
    (export.flux.lora.lora_target_modules, the CPU graph's branch set) of the checkpoint's transformer,
    read on the meta device. The same layout the CPU export writes, so one adapter store serves both."""
    from common.adapter_bank import BANK_FILE, BankLayout
    from export.flux.lora import lora_target_modules

    slot = FLUX_PIPELINE_SLOTS[FLUX_TRANSFORMER]
    folder = settings.build_dir / "torch" / FLUX_TRANSFORMER / f"bank-{fingerprint(dict(branch))}"

    def save_layout(staging: Path) -> dict[str, Any]:
        structure = meta_module(slot, checkpoint_folder(checkpoint) / slot)
        layout = BankLayout.build(
            lora_target_modules(structure), int(branch["rank"]), branch["layout"], str(branch["base_fingerprint"])
        )
        layout.save(staging)
        return {"layers": len(layout.layers), "slot_bytes_fp32": layout.slot_bytes()}

    _built(folder, save_layout)
    return BANK_FILE, folder / BANK_FILE


def _files(folder: Path, prefix: str) -> dict[str, Path]:
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": p for p in sorted(folder.rglob("*")) if p.is_file()}


def _built(folder: Path, make: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """`make(staging)` once per build folder: reused when complete, never rewritten in place
    (published versions hard-link its files)."""
    marker = folder / BUILD_MARKER
    if marker.exists():
        return json.loads(marker.read_text())
    staging = folder.with_name(f".{folder.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        facts = make(staging)
        (staging / BUILD_MARKER).write_text(json.dumps(facts, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return facts


def torch_components(
    checkpoint: str | Path,
    lora: str | Path | None,
    lora_scale: float,
    lora_slots: Iterable[str],
    provenance: dict[str, Any],
    settings: FluxSettings,
    progress: Callable[[str, object], None] | None = None,
) -> dict[str, TorchComponentBuild]:
    """Files, provenance and report of each component's gpu-torch version. `lora_slots`: the
    pipeline components the LoRA has weights for (export.flux.lora.lora_targets)."""
    folder = checkpoint_folder(checkpoint)
    base = {k: provenance[k] for k in ("checkpoint", "checkpoint_files")} | {"torch_layout": TORCH_LAYOUT}
    with_lora = base | {k: provenance[k] for k in ("lora", "lora_files", "lora_scale")}
    adapted = set(lora_slots) if lora else set()
    state: tuple[dict, dict, dict] | None = None
    fused: list[Any] = []  # the LoRA-fused pipeline, loaded once if some component needs it
    out: dict[str, TorchComponentBuild] = {}
    for name in FLUX_COMPONENTS:
        slot = FLUX_PIPELINE_SLOTS[name]
        if progress is not None:
            progress(name, None)
        if slot not in adapted:
            out[name] = TorchComponentBuild(_files(folder / slot, MODULE_DIR), base, {"method": "checkpoint"})
        else:
            from export.flux.lora_deltas import NotPatchable, load_lora_state

            assert lora is not None
            state = state or load_lora_state(lora, settings.lora_weight_name)
            build_dir = settings.build_dir / "torch" / name / fingerprint(with_lora)
            try:
                factors = lora_factors(*state, slot, lora_scale, meta_module(slot, folder / slot))
            except NotPatchable as e:
                log.warning("%s: LoRA not expressible as factors (%s); saving the fused module", name, e)
                reason = str(e)

                def save_fused(staging: Path) -> dict[str, Any]:
                    if not fused:
                        from export.flux.lora import load_pipeline

                        fused.append(load_pipeline(checkpoint, lora, lora_scale, weight_name=settings.lora_weight_name))
                    getattr(fused[0], slot).save_pretrained(staging / MODULE_DIR, safe_serialization=True)
                    return {"method": "fused", "reason": reason}

                facts = _built(build_dir, save_fused)
                out[name] = TorchComponentBuild(_files(build_dir / MODULE_DIR, MODULE_DIR), with_lora, facts)
            else:
                in_place = name == FLUX_TRANSFORMER
                method = "lora factors, " + ("patched in place per call" if in_place else "added in place at load")

                def save_factors(staging: Path) -> dict[str, Any]:
                    save_lora_factors(staging / LORA_FILE, factors)
                    return {"method": method, "lora_layers": len(factors)}

                # A build made before may record another method: say how it is used now.
                facts = _built(build_dir, save_factors) | {"method": method}
                if in_place:
                    # The transformer's version is the base alone (a LoRA swap neither writes nor
                    # loads one); the factors travel with the pipeline versions that name them.
                    pipeline = {FUSED_LORA_FILE: build_dir / LORA_FILE}
                    out[name] = TorchComponentBuild(_files(folder / slot, MODULE_DIR), base, facts, pipeline)
                else:
                    files = _files(folder / slot, MODULE_DIR) | {LORA_FILE: build_dir / LORA_FILE}
                    out[name] = TorchComponentBuild(files, with_lora, facts)
        if progress is not None:
            progress(name, out[name].report["method"])
    return out
