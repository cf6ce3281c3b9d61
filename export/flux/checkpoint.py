"""A random-weight FLUX pipeline built offline, in Hugging Face layout.

The real FLUX.1-dev cannot be downloaded here, so tests and CPU benchmarks use a structurally
identical pipeline with random weights: the same component classes (FluxTransformer2DModel with
guidance embedding, a 16-channel 8x AutoencoderKL, CLIPTextModel, T5EncoderModel), the same
scheduler configuration, and tokenizers trained locally with `tokenizers`. Everything downstream
(LoRA fusing, ONNX export, the denoising loop) runs unchanged on it and on the real model.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.flux_assets import CHECKPOINT_MARKER
from export.flux.settings import LOCAL_T5_MAX_SEQUENCE_LENGTH, LocalSize

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
"""Bump when the architecture or training corpus changes, so old builds are rebuilt."""

CLIP_MAX_LENGTH = 77
"""CLIP's context; FluxPipeline pads the CLIP prompt to tokenizer.model_max_length."""

# FLUX.1-dev's VAE normalisation and scheduler configuration (scheduler/scheduler_config.json).
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


@dataclass(frozen=True)
class LocalFluxSpec:
    """Architecture of a local build. Invariants FLUX imposes are checked in __post_init__."""

    num_layers: int
    num_single_layers: int
    num_attention_heads: int
    attention_head_dim: int
    axes_dims_rope: tuple[int, int, int]
    text_dim: int
    """T5 d_model == transformer joint_attention_dim."""
    pooled_dim: int
    """CLIP hidden size == transformer pooled_projection_dim (FluxPipeline uses pooler_output)."""
    clip_layers: int
    clip_heads: int
    t5_layers: int
    t5_heads: int
    vae_channels: tuple[int, int, int, int]
    vae_groups: int
    vocab_size: int = 1000
    max_sequence_length: int = LOCAL_T5_MAX_SEQUENCE_LENGTH

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError("axes_dims_rope must sum to attention_head_dim (RoPE covers the whole head)")
        if len(self.vae_channels) != 4:
            raise ValueError("the VAE needs 4 blocks: 8x downsampling, so sides divisible by 16 work")


SPECS: dict[str, LocalFluxSpec] = {
    # Seconds per 64x64 image: for tests.
    "tiny": LocalFluxSpec(
        num_layers=1,
        num_single_layers=1,
        num_attention_heads=2,
        attention_head_dim=16,
        axes_dims_rope=(4, 6, 6),
        text_dim=32,
        pooled_dim=32,
        clip_layers=2,
        clip_heads=2,
        t5_layers=2,
        t5_heads=2,
        vae_channels=(8, 16, 16, 16),
        vae_groups=8,
    ),
    # Heavy enough that a CPU benchmark measures compute, not Python overhead.
    "small": LocalFluxSpec(
        num_layers=4,
        num_single_layers=8,
        num_attention_heads=4,
        attention_head_dim=96,
        axes_dims_rope=(16, 40, 40),
        text_dim=256,
        pooled_dim=256,
        clip_layers=2,
        clip_heads=4,
        t5_layers=2,
        t5_heads=4,
        vae_channels=(32, 64, 64, 64),
        vae_groups=16,
    ),
}


def training_corpus() -> list[str]:
    """A few hundred English sentences (photography / art vocabulary, the trigger phrase).

    Built from templates so the corpus is deterministic and lives in the code, not in a data file.
    """
    subjects = [
        "a red fox",
        "an old man",
        "a young woman",
        "a cat",
        "a dog",
        "a mountain lake",
        "a city street",
        "a lighthouse",
        "a bowl of fruit",
        "a horse",
        "a child",
        "a forest path",
        "a sailing boat",
        "a castle",
        "a portrait of a musician",
        "a field of flowers",
    ]
    places = [
        "in snow",
        "at sunset",
        "in the rain",
        "at night",
        "in a studio",
        "on the beach",
        "in autumn",
        "under neon lights",
        "in fog",
        "at golden hour",
    ]
    styles = [
        "Super Realism",
        "photorealistic",
        "oil painting",
        "watercolor",
        "35mm film photograph",
        "cinematic lighting",
        "high detail",
        "soft focus",
        "black and white photo",
        "digital art",
        "shallow depth of field",
        "bokeh",
        "wide angle lens",
        "HDR",
        "sharp focus, 8k",
    ]
    sentences = [
        f"{style}, {subject} {place}"
        for subject, place, style in itertools.islice(itertools.product(subjects, places, styles), 0, None, 7)
    ]
    sentences += [
        "Super Realism, a close-up portrait with natural skin texture and soft window light.",
        "The photographer adjusted the aperture, shutter speed and ISO before taking the picture.",
        "A painting of a quiet harbor with boats, rendered in warm colors and thick brush strokes.",
        "Make an image of a golden retriever running through a meadow in the morning.",
        "Can you draw a futuristic city skyline with flying cars and glowing towers?",
        "Hello, how are you today? I would like to talk about the weather.",
        "The quick brown fox jumps over the lazy dog.",
        "Generate a picture of a cup of coffee on a wooden table, photographed from above.",
    ]
    return sentences


def _train_clip_tokenizer(corpus: list[str], vocab_size: int):
    """BPE with CLIP's normaliser, pre-tokeniser and `</w>` suffix, wrapped as CLIPTokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(unk_token=eos, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[bos, eos],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    # Like CLIP's real vocabulary, hold every byte alone and as a word end, so no text maps to unk.
    for piece in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _train_t5_tokenizer(corpus: list[str], vocab_size: int, max_length: int):
    """Unigram (SentencePiece-style, `▁` word marker) wrapped as T5Tokenizer; pad=0, eos=1, unk=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    if [p for p, _ in vocab[:3]] != ["<pad>", "</s>", "<unk>"]:
        raise RuntimeError(f"unexpected special-token order in the trained T5 vocabulary: {vocab[:3]}")
    # extra_ids=0: sentinel tokens are for T5's span-corruption pretraining, unused by FLUX.
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _components(spec: LocalFluxSpec, seed: int) -> dict[str, object]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    corpus = training_corpus()
    tokenizer = _train_clip_tokenizer(corpus, spec.vocab_size)
    tokenizer_2 = _train_t5_tokenizer(corpus, spec.vocab_size, spec.max_sequence_length)

    # One seed per component, so changing one component's size does not reshuffle the others.
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_dim,
        pooled_projection_dim=spec.pooled_dim,
        guidance_embeds=True,
        axes_dims_rope=spec.axes_dims_rope,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.pooled_dim,
            intermediate_size=spec.pooled_dim * 2,
            num_hidden_layers=spec.clip_layers,
            num_attention_heads=spec.clip_heads,
            max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=spec.pooled_dim,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=spec.text_dim,
            d_kv=spec.text_dim // spec.t5_heads,
            d_ff=spec.text_dim * 2,
            num_layers=spec.t5_layers,
            num_heads=spec.t5_heads,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
        )
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        norm_num_groups=spec.vae_groups,
        scaling_factor=VAE_SCALING_FACTOR,
        shift_factor=VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()
    return dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _marker(size: LocalSize, seed: int) -> dict[str, object]:
    return {
        "builder_version": BUILDER_VERSION,
        "size": size,
        "seed": seed,
        "max_sequence_length": SPECS[size].max_sequence_length,
        "spec": asdict(SPECS[size]),
    }


def is_complete(out_dir: Path, size: LocalSize, seed: int) -> bool:
    """True when out_dir holds a finished build of exactly this size, seed and builder version."""
    marker = Path(out_dir) / CHECKPOINT_MARKER
    if not marker.exists() or not (Path(out_dir) / "model_index.json").exists():
        return False
    try:
        found = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return json.loads(json.dumps(_marker(size, seed))) == found


def build_local_flux(out_dir: Path, size: LocalSize = "tiny", seed: int = 0) -> Path:
    """Build a random-weight FLUX pipeline and save it so `FluxPipeline.from_pretrained` loads it.

    Deterministic for (size, seed). Idempotent: an existing complete build with the same
    size/seed is returned untouched. The build goes to a sibling temp dir and is moved into
    place, so an interrupted build never looks complete.
    """
    from diffusers import FluxPipeline

    out_dir = Path(out_dir)
    if is_complete(out_dir, size, seed):
        log.info("local FLUX (%s, seed %d) already built at %s", size, seed, out_dir)
        return out_dir
    spec = SPECS[size]
    log.info("building local random-weight FLUX (%s, seed %d) at %s", size, seed, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        staging = Path(tmp) / "checkpoint"
        pipe = FluxPipeline(**_components(spec, seed))
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / CHECKPOINT_MARKER).write_text(json.dumps(_marker(size, seed), indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    return out_dir


def parameter_count(pipeline: object) -> dict[str, int]:
    """Parameters per component of a loaded pipeline (for logs and reports)."""
    counts = {}
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipeline, name, None)
        if module is not None:
            counts[name] = sum(p.numel() for p in module.parameters())
    return counts
