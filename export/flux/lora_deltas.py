"""A LoRA file read as per-layer low-rank deltas, the way diffusers' FLUX loader reads it.

The one reader of LoRA weights for every way a LoRA reaches the served model: patched into ONNX
weights (export.flux.weight_patch), refitted into a TensorRT engine (export.flux.trt_refit), or
written as factors the gpu-torch model adds in place (export.flux.torch_export). Needs torch and
diffusers only, not onnx: the gpu-torch path runs where onnx is not installed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_SUFFIX = re.compile(
    r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up"
    r"|lora_linear_layer\.down|lora_linear_layer\.up)\.weight$"
)
_DOWN = {"lora_A", "lora_down", "lora.down", "lora_linear_layer.down"}


class NotPatchable(ValueError):
    """The LoRA changes something the weight map cannot express; re-export instead."""


@dataclass(frozen=True)
class LayerDelta:
    down: torch.Tensor
    """lora_A: (rank, in)."""
    up: torch.Tensor
    """lora_B: (out, rank)."""
    scale: float

    def weight_delta(self) -> torch.Tensor:
        """(out, in), as PEFT's get_delta_weight computes it for a Linear layer."""
        return (self.up.float() @ self.down.float()) * self.scale


def load_lora_state(lora: str | Path, weight_name: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """(state dict, network alphas, adapter metadata) as diffusers' FLUX loader reads them, so
    Kohya / ai-toolkit / xlabs layouts are converted (and alphas folded) exactly as when loading."""
    from diffusers import FluxPipeline

    from export.flux.lora import resolve_lora

    source, name = resolve_lora(lora, weight_name)
    state, alphas, metadata = FluxPipeline.lora_state_dict(
        source, weight_name=name, return_alphas=True, return_lora_metadata=True
    )
    return state, alphas or {}, metadata or {}


def layer_deltas(
    state: dict[str, torch.Tensor], alphas: dict[str, Any], metadata: dict, component_prefix: str, lora_scale: float
) -> dict[str, LayerDelta]:
    """The deltas a LoRA state dict applies to one component (keys starting `component_prefix`,
    e.g. "transformer."), keyed by layer path inside that component. Raises NotPatchable for
    keys that are not plain low-rank Linear updates (biases, DoRA magnitudes, full diffs) and for
    per-module alpha/rank patterns carried in adapter metadata."""
    meta = _component_metadata(metadata, component_prefix)
    if meta.get("alpha_pattern") or meta.get("rank_pattern"):
        raise NotPatchable("adapter metadata with per-module alpha/rank patterns")
    sub = {k[len(component_prefix) :]: v for k, v in state.items() if k.startswith(component_prefix)}
    if component_prefix == "text_encoder." and sub:
        # What diffusers' text-encoder loader does first: old attention-processor names
        # (`self_attn.to_q_lora.down`, as its Kohya converter emits) become PEFT names (`q_proj.lora_A`).
        from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

        sub = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))
    pairs: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in sub.items():
        m = _SUFFIX.match(key)
        if m is None:
            raise NotPatchable(f"LoRA key {key!r} is not a low-rank Linear weight")
        pairs[m["path"]]["down" if m["kind"] in _DOWN else "up"] = value
    deltas = {}
    for path, pair in pairs.items():
        if set(pair) != {"down", "up"}:
            raise NotPatchable(f"{component_prefix}{path}: needs both lora_A and lora_B")
        rank = pair["down"].shape[0]
        alpha = alphas.get(f"{component_prefix}{path}.alpha", meta.get("lora_alpha", rank))
        alpha = float(alpha.item() if isinstance(alpha, torch.Tensor) else alpha)
        deltas[path] = LayerDelta(pair["down"], pair["up"], lora_scale * alpha / rank)
    return deltas


def _component_metadata(metadata: dict, component_prefix: str) -> dict:
    comp = component_prefix.rstrip(".")
    if isinstance(metadata.get(comp), dict):
        return metadata[comp]
    return {k[len(component_prefix) :]: v for k, v in metadata.items() if k.startswith(component_prefix)}
