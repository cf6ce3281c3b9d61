"""The local random-weight FLUX checkpoint and LoRA: build, load offline, idempotence, fusing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import FluxPipeline  # noqa: E402

from common.flux_assets import CHECKPOINT_MARKER as MARKER  # noqa: E402
from common.flux_assets import LORA_MANIFEST, LORA_WEIGHT_NAME, read_max_sequence_length
from export.flux.checkpoint import SCHEDULER_CONFIG, build_local_flux  # noqa: E402
from export.flux.lora import load_pipeline, resolve_lora  # noqa: E402
from export.flux.settings import LOCAL_T5_MAX_SEQUENCE_LENGTH, REAL_LORA, REAL_LORA_WEIGHT_NAME, TRIGGER_WORD  # noqa: E402

pytestmark = pytest.mark.slow


def _transformer_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(batch, 16, 64, generator=g),
        encoder_hidden_states=torch.randn(batch, 10, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.tensor([0.9, 0.3][:batch]),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
        txt_ids=torch.zeros(10, 3),
        guidance=torch.full((batch,), 3.5),
    )


def test_checkpoint_loads_offline_with_flux_layout(tiny_checkpoint: Path) -> None:
    pipe = FluxPipeline.from_pretrained(tiny_checkpoint)
    t, vae = pipe.transformer.config, pipe.vae.config
    assert t.guidance_embeds and t.in_channels == 64 and sum(t.axes_dims_rope) == t.attention_head_dim
    assert t.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert t.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert vae.latent_channels == 16 and len(vae.block_out_channels) == 4
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
    for key, value in SCHEDULER_CONFIG.items():
        assert pipe.scheduler.config[key] == value, key
    assert pipe.tokenizer.model_max_length == 77
    assert read_max_sequence_length(tiny_checkpoint) == LOCAL_T5_MAX_SEQUENCE_LENGTH
    assert read_max_sequence_length(tiny_checkpoint.parent / "no-such-checkpoint") == 512


def test_tokenizers_cover_the_prompt_vocabulary(tiny_checkpoint: Path) -> None:
    pipe = FluxPipeline.from_pretrained(
        tiny_checkpoint, text_encoder=None, text_encoder_2=None, transformer=None, vae=None
    )
    prompt = "Super Realism, a red fox in snow; ÉTÉ 2024!"
    clip = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    t5 = pipe.tokenizer_2(prompt, padding="max_length", max_length=64, truncation=True).input_ids
    assert len(clip) == 77 and clip[0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer.eos_token_id in clip
    assert pipe.tokenizer.unk_token_id not in clip[1 : clip.index(pipe.tokenizer.eos_token_id)]
    assert len(t5) == 64 and t5[-1] == pipe.tokenizer_2.pad_token_id and pipe.tokenizer_2.eos_token_id in t5
    assert pipe.tokenizer.decode(clip, skip_special_tokens=True).startswith("super realism")


def test_build_is_idempotent_and_deterministic(tiny_checkpoint: Path, tmp_path: Path) -> None:
    weights = tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_local_flux(tiny_checkpoint, "tiny", seed=0) == tiny_checkpoint
    assert weights.stat().st_mtime_ns == before, "a complete build with the same size/seed was rebuilt"
    assert json.loads((tiny_checkpoint / MARKER).read_text())["seed"] == 0

    again = build_local_flux(tmp_path / "same", "tiny", seed=0)
    other = build_local_flux(tmp_path / "other", "tiny", seed=1)
    ref = load_file(weights)
    same = load_file(again / "transformer" / "diffusion_pytorch_model.safetensors")
    diff = load_file(other / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert any(not torch.equal(ref[k], diff[k]) for k in ref)
    # A marker from another seed means "rebuild", not "done".
    assert build_local_flux(tmp_path / "same", "tiny", seed=1) == tmp_path / "same"
    assert json.loads((tmp_path / "same" / MARKER).read_text())["seed"] == 1


def test_lora_file_uses_diffusers_peft_keys(tiny_lora: Path) -> None:
    sd = load_file(tiny_lora / LORA_WEIGHT_NAME)
    assert sd and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    assert any(".attn.to_q." in k for k in sd) and any(".attn.add_q_proj." in k for k in sd)
    assert all(v.abs().max() > 0 for k, v in sd.items() if "lora_B" in k)
    assert json.loads((tiny_lora / LORA_MANIFEST).read_text())["trigger_word"] == TRIGGER_WORD


def test_real_lora_resolves_to_its_weight_file() -> None:
    assert resolve_lora(REAL_LORA) == (REAL_LORA, REAL_LORA_WEIGHT_NAME)


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_fused_lora_equals_unfused_peft_and_differs_from_base(
    tiny_checkpoint: Path, tiny_lora: Path, scale: float
) -> None:
    kw = _transformer_inputs()
    base = load_pipeline(tiny_checkpoint, None)
    fused = load_pipeline(tiny_checkpoint, tiny_lora, lora_scale=scale)
    peft = load_pipeline(tiny_checkpoint, tiny_lora, lora_scale=scale, fuse=False)
    assert not any("lora" in name for name, _ in fused.transformer.named_modules()), "adapters left after fusing"
    with torch.no_grad():
        out_base = base.transformer(**kw, return_dict=False)[0]
        out_fused = fused.transformer(**kw, return_dict=False)[0]
        out_peft = peft.transformer(**kw, return_dict=False)[0]
    fused_vs_peft = (out_fused - out_peft).abs().max().item()
    fused_vs_base = (out_fused - out_base).abs().max().item()
    assert fused_vs_peft < 1e-5, fused_vs_peft
    assert fused_vs_base > 1e-2, fused_vs_base


def test_a_new_lora_re_exports_only_the_components_it_changes(tiny_lora: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from contract.specs import FLUX_TEXT_ENCODER, FLUX_TEXT_ENCODER_2, FLUX_TRANSFORMER, FLUX_VAE_DECODER
    from export.fingerprints import fingerprint
    from export.flux.lora import lora_targets
    from export.flux_build import component_provenance

    assert lora_targets(tiny_lora) == {"transformer"}
    sd = load_file(tiny_lora / LORA_WEIGHT_NAME)
    clip_key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    sd |= {f"{clip_key}.lora_A.weight": torch.zeros(4, 32), f"{clip_key}.lora_B.weight": torch.zeros(32, 4)}
    save_file(sd, tmp_path / "with_clip.safetensors")
    assert lora_targets(tmp_path / "with_clip.safetensors") == {"transformer", "text_encoder"}

    prov = {
        "checkpoint": "c",
        "checkpoint_files": {"a": "1"},
        "onnx_opset": 18,
        "lora": "l",
        "lora_files": {"w": "2"},
        "lora_scale": 1.0,
        "trigger_word": "t",
    }
    other_lora = {**prov, "lora": "m", "lora_files": {"w": "3"}}
    for targets, changed in (
        (frozenset({"transformer"}), {FLUX_TRANSFORMER}),
        (frozenset({"transformer", "text_encoder"}), {FLUX_TRANSFORMER, FLUX_TEXT_ENCODER}),
    ):
        a, b = component_provenance(prov, targets), component_provenance(other_lora, targets)
        assert {n for n in a if fingerprint(a[n]) != fingerprint(b[n])} == changed
        assert "trigger_word" not in a[FLUX_TRANSFORMER]  # new trigger words alone re-export nothing
        assert a[FLUX_TEXT_ENCODER_2] == a[FLUX_VAE_DECODER]
