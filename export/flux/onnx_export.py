"""FLUX components to ONNX, one file per Triton model, each checked against PyTorch.

Every graph is batch-major with a dynamic batch axis so Triton's dynamic batcher can merge
concurrent generations along dim 0. Exports use the dynamo exporter (opset >= 18 for RMSNorm)
and sample inputs whose dynamic axes are all >= 2 and pairwise different: a size-1 axis gets
specialised to 1, and equal sample sizes can make the exporter tie two axes together.

Layout written by `export_all(pipeline, out_dir)`: `out_dir/<model name>/model.onnx` (plus
`model.onnx.data` when the weights exceed protobuf's 2 GB limit), where the model names come from
`contract.specs`. The transformer and CLIP, the components a LoRA changes, keep their weights
one file per tensor in `weights/` with a `weight_map.json` (export.flux.weight_map), so a LoRA is
later applied by rewriting only the tensors it changes (export.flux.weight_patch).

Tensor semantics (all float32 unless noted):
- flux_text_encoder: input_ids int64 (B, 77) -> pooled_embeds (B, D_clip); CLIP `pooler_output`.
- flux_text_encoder_2: input_ids int64 (B, L) -> text_embeds (B, L, D_t5).
- flux_transformer: hidden_states (B, N, 64), encoder_hidden_states (B, L, D_t5),
  pooled_projections (B, D_clip), timestep (B,), img_ids (B, N, 3), txt_ids (B, L, 3),
  guidance (B,) -> latent (B, N, 64). `timestep` is exactly what FluxPipeline passes to the
  transformer: the scheduler's timestep divided by 1000, i.e. the sigma in [0, 1]. `guidance` is
  the raw guidance scale (e.g. 3.5); the model multiplies both by 1000 internally. The ids are
  batch-major for Triton only: the graph uses row 0 (every row of a merged batch is equal,
  because only requests of the same image size and text length can merge).
- flux_vae_decoder: latent (B, 16, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1]; the latent
  is already un-scaled (`latent / scaling_factor + shift_factor`), as diffusers does before decode.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.ort_session import make_session
from contract.specs import (
    FLUX_IO_NAMES,
    FLUX_MAX_BATCH,
    FLUX_TEXT_ENCODER,
    FLUX_TEXT_ENCODER_2,
    FLUX_TRANSFORMER,
    FLUX_VAE_DECODER,
    GENERATE_LIMITS,
)
from export.flux.weight_map import WEIGHT_MAP_FILE, WEIGHTS_DIR, externalize_and_map

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 18
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
"""Above this, weights go to a side file: a single protobuf cannot exceed 2 GB."""

# Upper bounds for the dynamic axes (export needs finite ranges to reason about shapes).
_MAX_BATCH = FLUX_MAX_BATCH * 4
_MAX_TEXT_LEN = 512
_MAX_LATENT_SIDE = GENERATE_LIMITS.max_side // 8
_MAX_IMAGE_TOKENS = (GENERATE_LIMITS.max_side // 16) ** 2


@dataclass(frozen=True)
class ExportResult:
    """One exported component: where it is and how far it is from PyTorch."""

    name: str
    path: Path
    max_abs_error: float
    """Max |ONNX Runtime - PyTorch| on an input of a batch size and shape the export never saw."""
    check_seconds: float
    export_seconds: float
    check_shapes: dict[str, tuple[int, ...]]
    external_data: bool


# ----------------------------------------------------------------------------- wrappers


class ClipPooled(torch.nn.Module):
    """CLIP text model -> pooler_output, the only CLIP output FluxPipeline uses."""

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, output_hidden_states=False).pooler_output


class T5Embeds(torch.nn.Module):
    """T5 encoder -> last hidden state (FluxPipeline passes no attention mask, so neither do we)."""

    def __init__(self, text_encoder_2: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder_2 = text_encoder_2

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder_2(input_ids, output_hidden_states=False)[0]


class BatchMajorFluxTransformer(torch.nn.Module):
    """FluxTransformer2DModel with every input batch-major, for Triton's batcher."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        # diffusers takes 2-D ids (3-D is deprecated); all rows of a merged batch are equal.
        # Models without guidance embedding (schnell) reject a guidance tensor: keep the input, drop the value.
        return self.transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids[0],
            txt_ids=txt_ids[0],
            guidance=guidance if self.transformer.config.guidance_embeds else None,
            return_dict=False,
        )[0]


class VaeDecode(torch.nn.Module):
    """AutoencoderKL.decode(latent).sample; scaling/shift stay in the loop, as in diffusers."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


# ----------------------------------------------------------------------------- inputs


def image_ids(batch: int, latent_h: int, latent_w: int) -> np.ndarray:
    """FluxPipeline's latent image ids for an image of latent size (h, w), repeated per batch row."""
    from diffusers import FluxPipeline

    ids = FluxPipeline._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, "cpu", torch.float32).numpy()
    return np.repeat(ids[None].astype(np.float32), batch, axis=0)


def transformer_inputs(
    transformer: torch.nn.Module, batch: int, latent_h: int, latent_w: int, text_len: int, seed: int
) -> dict[str, np.ndarray]:
    """Random transformer inputs in the ranges the pipeline produces, keyed by contract names."""
    cfg = transformer.config
    rng = np.random.default_rng(seed)
    tokens = (latent_h // 2) * (latent_w // 2)
    values = {
        "hidden_states": rng.standard_normal((batch, tokens, cfg.in_channels)),
        "encoder_hidden_states": rng.standard_normal((batch, text_len, cfg.joint_attention_dim)),
        "pooled_projections": rng.standard_normal((batch, cfg.pooled_projection_dim)),
        "timestep": rng.uniform(0.05, 1.0, batch),
        "img_ids": image_ids(batch, latent_h, latent_w),
        "txt_ids": np.zeros((batch, text_len, 3)),
        "guidance": rng.uniform(1.0, 5.0, batch),
    }
    names = FLUX_IO_NAMES[FLUX_TRANSFORMER][0]
    return {n: np.ascontiguousarray(values[n], dtype=np.float32) for n in names}


def _token_ids(vocab_size: int, batch: int, length: int, seed: int, eos_id: int | None = None) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(3, vocab_size, (batch, length), dtype=np.int64)
    if eos_id is not None:  # CLIP pools at the first eos: put one in every row, like the tokenizer
        ids[:, length // 2] = eos_id
    return ids


# ----------------------------------------------------------------------------- export core


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _export(
    name: str,
    module: torch.nn.Module,
    sample: dict[str, np.ndarray],
    dynamic: dict[str, dict[int, object]],
    check: dict[str, np.ndarray],
    out_dir: Path,
    opset: int,
    weight_map: tuple[torch.nn.Module, str, set[str]] | None = None,
) -> ExportResult:
    """torch.onnx (dynamo) export of `module`, then an ONNX Runtime vs PyTorch check on `check`.

    With `weight_map` = (inner module, its parameter prefix, required layers), weights are stored
    one file per tensor and the Linear layer -> initializer map is built and saved beside the
    model (export.flux.weight_map), so a LoRA can later be patched in without re-exporting."""

    input_names, output_names = FLUX_IO_NAMES[name]
    path = Path(out_dir) / name / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(ONNX_FILE + "*"):
        stale.unlink()
    shutil.rmtree(path.parent / WEIGHTS_DIR, ignore_errors=True)
    (path.parent / WEIGHT_MAP_FILE).unlink(missing_ok=True)
    module = module.eval()
    external = _param_bytes(module) > EXTERNAL_DATA_THRESHOLD_BYTES
    started = time.monotonic()
    args = tuple(torch.from_numpy(sample[n]) for n in input_names)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes={n: dynamic[n] for n in input_names},
            optimize=True,
        )
    program.save(str(path), external_data=external)
    if weight_map is not None:
        externalize_and_map(path, *weight_map)
        external = True
    export_s = time.monotonic() - started

    started = time.monotonic()
    with torch.no_grad():
        ref = module(*(torch.from_numpy(check[n]) for n in input_names)).numpy()
    sess = make_session(path, 0, spinning=True)
    (got,) = sess.run(list(output_names), {n: check[n] for n in input_names})
    err = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
    check_s = time.monotonic() - started
    shapes = {n: tuple(check[n].shape) for n in input_names} | {output_names[0]: tuple(got.shape)}
    log.info(
        "%s: exported in %.1fs to %s; max |ORT - torch| = %.3g on %s (%.1fs)",
        name,
        export_s,
        path,
        err,
        shapes,
        check_s,
    )
    return ExportResult(name, path, err, check_s, export_s, shapes, external)


def export_text_encoder(
    text_encoder: torch.nn.Module, out_dir: Path, opset: int = DEFAULT_OPSET, max_length: int = 77
) -> ExportResult:
    """CLIP: input_ids (B, max_length) int64 -> pooled_embeds (B, D). Length is fixed (padded)."""
    vocab, eos = text_encoder.config.vocab_size, text_encoder.config.eos_token_id
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    return _export(
        FLUX_TEXT_ENCODER,
        ClipPooled(text_encoder),
        {"input_ids": _token_ids(vocab, 2, max_length, 0, eos)},
        {"input_ids": {0: batch}},
        {"input_ids": _token_ids(vocab, 3, max_length, 1, eos)},
        out_dir,
        opset,
        weight_map=(text_encoder, "text_encoder.", set()),
    )


def export_text_encoder_2(text_encoder_2: torch.nn.Module, out_dir: Path, opset: int = DEFAULT_OPSET) -> ExportResult:
    """T5: input_ids (B, L) int64 -> text_embeds (B, L, D); dynamic B and L."""
    vocab = text_encoder_2.config.vocab_size
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    length = torch.export.Dim("text_len", min=2, max=_MAX_TEXT_LEN)
    return _export(
        FLUX_TEXT_ENCODER_2,
        T5Embeds(text_encoder_2),
        {"input_ids": _token_ids(vocab, 2, 12, 0)},
        {"input_ids": {0: batch, 1: length}},
        {"input_ids": _token_ids(vocab, 3, 20, 1)},
        out_dir,
        opset,
    )


def export_transformer(transformer: torch.nn.Module, out_dir: Path, opset: int = DEFAULT_OPSET) -> ExportResult:
    """The batch-major transformer (see module docstring); dynamic B, N (image tokens), L (text)."""
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    tokens = torch.export.Dim("image_tokens", min=2, max=_MAX_IMAGE_TOKENS)
    text = torch.export.Dim("text_len", min=2, max=_MAX_TEXT_LEN)
    dynamic = {
        "hidden_states": {0: batch, 1: tokens},
        "encoder_hidden_states": {0: batch, 1: text},
        "pooled_projections": {0: batch},
        "timestep": {0: batch},
        "img_ids": {0: batch, 1: tokens},
        "txt_ids": {0: batch, 1: text},
        "guidance": {0: batch},
    }
    # Sample: a 4x6-token image (64x96 px) with 12 text tokens; check: 3 rows, 10x8 tokens, 20 text.
    sample = transformer_inputs(transformer, 2, 8, 12, 12, seed=0)
    check = transformer_inputs(transformer, 3, 20, 16, 20, seed=1)
    from export.flux.lora import lora_target_modules

    return _export(
        FLUX_TRANSFORMER,
        BatchMajorFluxTransformer(transformer),
        sample,
        dynamic,
        check,
        out_dir,
        opset,
        weight_map=(transformer, "transformer.", set(lora_target_modules(transformer))),
    )


def export_vae_decoder(vae: torch.nn.Module, out_dir: Path, opset: int = DEFAULT_OPSET) -> ExportResult:
    """latent (B, C, h, w) -> images (B, 3, 8h, 8w); dynamic B, h, w."""
    channels = vae.config.latent_channels
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    h = torch.export.Dim("latent_h", min=2, max=_MAX_LATENT_SIDE)
    w = torch.export.Dim("latent_w", min=2, max=_MAX_LATENT_SIDE)
    rng = np.random.default_rng(0)
    sample = {"latent": rng.standard_normal((2, channels, 8, 12)).astype(np.float32)}
    check = {"latent": rng.standard_normal((3, channels, 12, 10)).astype(np.float32)}
    return _export(FLUX_VAE_DECODER, VaeDecode(vae), sample, {"latent": {0: batch, 2: h, 3: w}}, check, out_dir, opset)


ProgressCallback = Callable[[str, "ExportResult | None"], None]
"""progress(model_name, None) when a component starts, progress(model_name, result) when done."""


def export_all(
    pipeline,
    out_dir: Path,
    progress: ProgressCallback | None = None,
    opset: int = DEFAULT_OPSET,
    only: Iterable[str] | None = None,
) -> dict[str, ExportResult]:
    """Export the four components of a (LoRA-fused) FluxPipeline (or those named in `only`) to
    `out_dir/<model name>/model.onnx`."""
    jobs: dict[str, Callable[[], ExportResult]] = {
        FLUX_TEXT_ENCODER: lambda: export_text_encoder(
            pipeline.text_encoder, out_dir, opset, pipeline.tokenizer.model_max_length
        ),
        FLUX_TEXT_ENCODER_2: lambda: export_text_encoder_2(pipeline.text_encoder_2, out_dir, opset),
        FLUX_TRANSFORMER: lambda: export_transformer(pipeline.transformer, out_dir, opset),
        FLUX_VAE_DECODER: lambda: export_vae_decoder(pipeline.vae, out_dir, opset),
    }
    wanted = set(jobs) if only is None else set(only)
    results: dict[str, ExportResult] = {}
    for name, job in jobs.items():
        if name not in wanted:
            continue
        if progress is not None:
            progress(name, None)
        results[name] = job()
        if progress is not None:
            progress(name, results[name])
    return results


def onnx_path(onnx_dir: Path, name: str) -> Path:
    """Where export_all put component `name`."""
    return Path(onnx_dir) / name / ONNX_FILE
