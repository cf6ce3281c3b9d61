"""LoRA for the FLUX transformer: a local random one, and loading + fusing any one into a pipeline.

The production configuration is FLUX.1-dev (`black-forest-labs/FLUX.1-dev`) with
`strangerzonehf/Flux-Super-Realism-LoRA` (file `super-realism.safetensors`, trigger phrase
"Super Realism") fused into the transformer's weights. Fusing before export means the ONNX
transformer carries the LoRA at zero runtime cost and Triton never sees adapters.

The local LoRA uses the diffusers/PEFT key format that `FluxPipeline.save_lora_weights` writes
and `load_lora_weights` reads: `transformer.<module path>.lora_A.weight` (rank x in) and
`.lora_B.weight` (out x rank), on the attention projections of the double-stream blocks
(image and text streams) and of the single-stream blocks, plus the single blocks' fused
MLP/output projections, which is where FLUX LoRA trainers (ai-toolkit, kohya) put them too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common import flux_assets
from common.flux_assets import LORA_WEIGHT_NAME, write_lora_manifest
from export.flux.settings import REAL_LORA, REAL_LORA_WEIGHT_NAME, TRIGGER_WORD

log = logging.getLogger(__name__)


DOUBLE_BLOCK_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
SINGLE_BLOCK_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def lora_target_modules(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The transformer's Linear layers a FLUX LoRA adapts, by module path."""
    targets: dict[str, torch.nn.Linear] = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.startswith("transformer_blocks.") and name.split(".", 2)[2] in DOUBLE_BLOCK_TARGETS:
            targets[name] = module
        elif name.startswith("single_transformer_blocks.") and name.split(".", 2)[2] in SINGLE_BLOCK_TARGETS:
            targets[name] = module
    return targets


def build_local_lora(
    checkpoint_dir: Path, out_dir: Path, rank: int = 4, seed: int = 0, trigger_word: str = TRIGGER_WORD
) -> Path:
    """Write a random LoRA for the checkpoint's transformer; returns out_dir.

    lora_B is non-zero (a freshly initialised trained LoRA has B = 0 and would change nothing),
    scaled so the fused model differs clearly from the base without drowning it.
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel

    out_dir = Path(out_dir)
    transformer = FluxTransformer2DModel.from_pretrained(Path(checkpoint_dir) / "transformer")
    gen = torch.Generator("cpu").manual_seed(seed)
    layers: dict[str, torch.Tensor] = {}
    for name, linear in sorted(lora_target_modules(transformer).items()):
        a = torch.randn(rank, linear.in_features, generator=gen) / linear.in_features**0.5
        b = torch.randn(linear.out_features, rank, generator=gen) * (0.5 / rank**0.5)
        layers[f"{name}.lora_A.weight"] = a.contiguous()
        layers[f"{name}.lora_B.weight"] = b.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_lora_weights adds the `transformer.` prefix, exactly as for a trained LoRA.
    FluxPipeline.save_lora_weights(
        out_dir, transformer_lora_layers=layers, weight_name=LORA_WEIGHT_NAME, safe_serialization=True
    )
    manifest = {
        "trigger_word": trigger_word,
        "rank": rank,
        "seed": seed,
        "weight_name": LORA_WEIGHT_NAME,
        "base_checkpoint": str(Path(checkpoint_dir).resolve()),
        "target_modules": len(layers) // 2,
    }
    write_lora_manifest(out_dir, manifest)
    log.info("local LoRA (rank %d, %d modules) written to %s", rank, len(layers) // 2, out_dir)
    return out_dir


def read_lora_manifest(lora: str | Path) -> dict[str, object]:
    """The manifest of a local LoRA (trained or built here); for the real hub LoRA, its known trigger."""
    manifest = flux_assets.read_lora_manifest(lora)
    if not manifest and str(lora) == REAL_LORA:
        return {"trigger_word": TRIGGER_WORD}
    return manifest


def resolve_lora(lora: str | Path, weight_name: str | None = None) -> tuple[str, str | None]:
    """(what to pass to load_lora_weights, weight_name) for a file, a directory or a hub id."""
    path = Path(lora)
    if path.is_file():
        return str(path.parent), path.name
    if path.is_dir():
        if weight_name is None and not (path / LORA_WEIGHT_NAME).exists():
            candidates = sorted(path.glob("*.safetensors"))
            if len(candidates) != 1:
                raise FileNotFoundError(f"{path}: expected {LORA_WEIGHT_NAME} or exactly one .safetensors file")
            weight_name = candidates[0].name
        return str(path), weight_name or LORA_WEIGHT_NAME
    # A hub id: the real LoRA's repository also holds images, so name its weight file.
    if weight_name is None and str(lora) == REAL_LORA:
        weight_name = REAL_LORA_WEIGHT_NAME
    return str(lora), weight_name


def lora_targets(lora: str | Path, weight_name: str | None = None) -> frozenset[str]:
    """The pipeline components a LoRA has weights for ("transformer", "text_encoder"), read with
    diffusers' own loader so that Kohya / ai-toolkit files are converted exactly as when loading."""
    from diffusers import FluxPipeline

    source, name = resolve_lora(lora, weight_name)
    state = FluxPipeline.lora_state_dict(source, weight_name=name)
    state = state[0] if isinstance(state, tuple) else state
    return frozenset(key.split(".", 1)[0] for key in state)


def load_pipeline(
    checkpoint: str | Path,
    lora: str | Path | None,
    lora_scale: float = 1.0,
    torch_dtype: torch.dtype = torch.float32,
    fuse: bool = True,
    weight_name: str | None = None,
    adapter_name: str = "default",
):
    """Load a FLUX pipeline (local dir or hub id) and apply a LoRA.

    fuse=True folds `lora_scale * B @ A` into the base weights and drops the adapters, leaving a
    plain FluxPipeline to export. fuse=False keeps the PEFT adapters active at `lora_scale`
    (the reference the fused model is tested against).

    Example (production): load_pipeline("black-forest-labs/FLUX.1-dev",
    "strangerzonehf/Flux-Super-Realism-LoRA", torch_dtype=torch.bfloat16).
    """
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(checkpoint), dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    if lora is None:
        return pipe
    source, name = resolve_lora(lora, weight_name)
    pipe.load_lora_weights(source, weight_name=name, adapter_name=adapter_name)
    if fuse:
        pipe.fuse_lora(lora_scale=lora_scale, adapter_names=[adapter_name])
        # Keeps the fused weights, removes the PEFT wrappers so export sees plain Linear layers.
        pipe.unload_lora_weights()
        log.info("LoRA %s fused at scale %.3g", lora, lora_scale)
    else:
        pipe.set_adapters([adapter_name], adapter_weights=[lora_scale])
    return pipe
