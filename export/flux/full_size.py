"""A FLUX.1-dev-sized checkpoint with random weights that never touch a disk: for the GPU benchmark.

FLUX.1-dev itself cannot be downloaded where the benchmark runs. Its compute can: this writes a
diffusers FLUX folder whose component configs are FLUX.1-dev's architecture (the transformer: 19
double-stream and 38 single-stream blocks, 24 heads of 128, joint attention dim 4096, pooled dim
768, guidance embedding, RoPE axes (16, 56, 56); CLIP ViT-L/14's text tower; T5 v1.1 XXL's
encoder; the 16-channel VAE), and in each component folder a `fluxserve_random_init.json` with a
seed instead of weights. The gpu-torch component model builds such a module with seeded random
weights directly on its device and in its dtype (serving/torch_components.py): 12B parameters
appear on an H100 in seconds instead of a 24 GB write and read, and every process that loads the
folder on the same device gets the same weights. Tokenizers are the local ones (export.flux.checkpoint)
and the vocabularies the real sizes, so token ids are valid and embedding tables weigh what they do.

`tiny` is the same builder at the tiny local size: the benchmark's dry run and CI use it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from common.flux_assets import CHECKPOINT_MARKER, LORA_WEIGHT_NAME, write_lora_manifest
from common.torch_runtime import MODULE_CLASSES, RANDOM_INIT_FILE
from export.flux.checkpoint import (
    CLIP_MAX_LENGTH,
    SCHEDULER_CONFIG,
    SPECS,
    VAE_SCALING_FACTOR,
    VAE_SHIFT_FACTOR,
    _train_clip_tokenizer,
    _train_t5_tokenizer,
    training_corpus,
)
from export.flux.settings import TRIGGER_WORD

log = logging.getLogger(__name__)

RandomSize = Literal["dev", "tiny"]
BUILDER_VERSION = 1
TOKENIZER_VOCAB = 1000

# FLUX.1-dev's component configurations (black-forest-labs/FLUX.1-dev, */config.json).
DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
DEV_CLIP: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
}
DEV_T5: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
}
DEV_VAE: dict[str, Any] = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
DEV_MAX_SEQUENCE_LENGTH = 512
DEV_PARAMETERS = {
    "transformer": 11_901_408_320,
    "text_encoder": 123_060_480,
    "text_encoder_2": 4_762_310_656,
    "vae": 83_819_683,
}
"""FLUX.1-dev's parameter counts per component (tests check the builder against them)."""


def _configs(size: RandomSize, clip_tok: Any, t5_tok: Any) -> dict[str, dict[str, Any]]:
    """Constructor arguments per component folder."""
    if size == "dev":
        transformer, clip, t5, vae = DEV_TRANSFORMER, DEV_CLIP, DEV_T5, DEV_VAE
    else:
        s = SPECS["tiny"]
        transformer = {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": s.num_layers,
            "num_single_layers": s.num_single_layers,
            "attention_head_dim": s.attention_head_dim,
            "num_attention_heads": s.num_attention_heads,
            "joint_attention_dim": s.text_dim,
            "pooled_projection_dim": s.pooled_dim,
            "guidance_embeds": True,
            "axes_dims_rope": s.axes_dims_rope,
        }
        clip = {
            "vocab_size": len(clip_tok),
            "hidden_size": s.pooled_dim,
            "intermediate_size": s.pooled_dim * 2,
            "num_hidden_layers": s.clip_layers,
            "num_attention_heads": s.clip_heads,
            "projection_dim": s.pooled_dim,
        }
        t5 = {
            "vocab_size": len(t5_tok),
            "d_model": s.text_dim,
            "d_kv": s.text_dim // s.t5_heads,
            "d_ff": s.text_dim * 2,
            "num_layers": s.t5_layers,
            "num_heads": s.t5_heads,
        }
        vae = {"block_out_channels": s.vae_channels, "layers_per_block": 1, "norm_num_groups": s.vae_groups}
    clip_ids = {k: getattr(clip_tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {
        "transformer": transformer,
        "text_encoder": {
            **clip,
            "max_position_embeddings": CLIP_MAX_LENGTH,
            "hidden_act": "quick_gelu",
            **clip_ids,
        },
        "text_encoder_2": {
            **t5,
            "feed_forward_proj": "gated-gelu",
            "is_encoder_decoder": False,
            "use_cache": False,
            "pad_token_id": t5_tok.pad_token_id,
            "eos_token_id": t5_tok.eos_token_id,
        },
        "vae": {
            **vae,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 16,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "scaling_factor": VAE_SCALING_FACTOR,
            "shift_factor": VAE_SHIFT_FACTOR,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
    }


def meta_modules(folder: Path) -> dict[str, torch.nn.Module]:
    """Every component of a built folder on the meta device (structure and counts, no memory)."""
    from export.flux.torch_export import meta_module

    return {slot: meta_module(slot, Path(folder) / slot) for slot in MODULE_CLASSES}


def _write_component(slot: str, kwargs: dict[str, Any], folder: Path, seed: int) -> None:
    import importlib

    package, name = MODULE_CLASSES[slot]
    cls = getattr(importlib.import_module(package), name)
    folder.mkdir(parents=True)
    if hasattr(cls, "config_class"):  # transformers: a config object
        cls.config_class(**kwargs).save_pretrained(folder)
    else:
        with torch.device("meta"):
            cls(**kwargs).save_config(folder)
    (folder / RANDOM_INIT_FILE).write_text(json.dumps({"seed": seed}))


def _marker(size: RandomSize, seed: int, max_sequence_length: int) -> dict[str, Any]:
    return {
        "builder": "random_init",
        "builder_version": BUILDER_VERSION,
        "size": size,
        "seed": seed,
        "max_sequence_length": max_sequence_length,
    }


def build_random_flux(out_dir: Path, size: RandomSize = "dev", seed: int = 0) -> Path:
    """Write a random-init FLUX folder (see the module docstring); idempotent per size and seed."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out_dir = Path(out_dir)
    marker = out_dir / CHECKPOINT_MARKER
    msl = DEV_MAX_SEQUENCE_LENGTH if size == "dev" else SPECS["tiny"].max_sequence_length
    if marker.exists() and json.loads(marker.read_text()) == _marker(size, seed, msl):
        return out_dir
    corpus = training_corpus()
    clip_tok = _train_clip_tokenizer(corpus, TOKENIZER_VOCAB)
    t5_tok = _train_t5_tokenizer(corpus, TOKENIZER_VOCAB, msl)
    configs = _configs(size, clip_tok, t5_tok)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        staging = Path(tmp) / "checkpoint"
        for i, slot in enumerate(("transformer", "text_encoder", "text_encoder_2", "vae")):
            _write_component(slot, configs[slot], staging / slot, seed + i)
        clip_tok.save_pretrained(staging / "tokenizer")
        t5_tok.save_pretrained(staging / "tokenizer_2")
        FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(staging / "scheduler")
        index = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
        index |= {slot: list(MODULE_CLASSES[slot]) for slot in MODULE_CLASSES}
        index |= {"tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"]}
        (staging / "model_index.json").write_text(json.dumps(index, indent=2))
        (staging / CHECKPOINT_MARKER).write_text(json.dumps(_marker(size, seed, msl), indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    log.info("random-init FLUX (%s, seed %d) written to %s", size, seed, out_dir)
    return out_dir


def build_random_lora(checkpoint_dir: Path, out_dir: Path, rank: int = 16, seed: int = 0) -> Path:
    """A random LoRA for a (random-init) checkpoint's transformer, in the trainer's key format, built
    from the module's structure on the meta device (so it needs no weights)."""
    from diffusers import FluxPipeline

    from export.flux.lora import lora_target_modules
    from export.flux.torch_export import meta_module

    out_dir = Path(out_dir)
    if (out_dir / LORA_WEIGHT_NAME).exists():
        return out_dir
    structure = meta_module("transformer", Path(checkpoint_dir) / "transformer")
    gen = torch.Generator("cpu").manual_seed(seed)
    layers: dict[str, torch.Tensor] = {}
    for name, linear in sorted(lora_target_modules(structure).items()):
        layers[f"{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=gen) / linear.in_features**0.5
        layers[f"{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=gen) * (0.05 / rank**0.5)
    out_dir.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        out_dir, transformer_lora_layers=layers, weight_name=LORA_WEIGHT_NAME, safe_serialization=True
    )
    write_lora_manifest(out_dir, {"trigger_word": TRIGGER_WORD, "rank": rank, "seed": seed})
    return out_dir
