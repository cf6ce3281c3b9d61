"""FLUX text-to-image as numpy around four component callables: diffusers' FluxPipeline, unrolled.

In Triton the `generate` python model runs this loop and every component call is a BLS request
(serving/triton_generate.py); in-process it runs on ONNX Runtime sessions (`ort_callables`) or on
the PyTorch modules (`torch_callables`). The numerics follow `FluxPipeline.__call__` step for
step and reuse its pieces wherever they are static (tokenizer calls, `randn_tensor` noise,
`_pack_latents` / `_unpack_latents` / `_prepare_latent_image_ids`, `calculate_shift`,
`retrieve_timesteps`, the FlowMatchEulerDiscreteScheduler from the checkpoint's config,
VaeImageProcessor), so a seed gives the image `FluxPipeline(..., generator=torch.Generator("cpu")
.manual_seed(seed))` gives, up to the components' own numeric differences.

FLUX.1-dev is guidance-distilled: one transformer call per step with a `guidance` input, no
classifier-free guidance. Component callables take and return numpy arrays named as in
`contract.specs.FLUX_IO_NAMES`, all batch-major; this loop always sends batch 1 (Triton merges
concurrent loops' calls into larger batches).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from common.flux_assets import read_max_sequence_length
from contract.specs import (
    FLUX_IO_NAMES,
    FLUX_TEXT_ENCODER,
    FLUX_TEXT_ENCODER_2,
    FLUX_TRANSFORMER,
    FLUX_VAE_DECODER,
    GenerateParams,
)
from serving.prompt_cache import PromptEmbeddingCache

log = logging.getLogger(__name__)

ComponentFn = Callable[..., np.ndarray]
"""Called as fn(*arrays in input order) or fn(**{input name: array}); returns the one output."""


@dataclass(frozen=True)
class Prepared:
    """Everything of a request that needs the tokenizers, torch's generator or diffusers'
    scheduler, as numpy: what the `flux_prepare` model returns over BLS (field = tensor name)."""

    pooled_embeds: np.ndarray  # (1, D) float32: CLIP's pooled output
    text_embeds: np.ndarray  # (1, max_sequence_length, D) float32: T5's output
    latents: np.ndarray  # (1, N, C) float32: packed noise
    img_ids: np.ndarray  # (1, N, 3) float32
    timesteps: np.ndarray  # (steps,) float32: the transformer's `timestep` input (t / 1000)
    sigmas: np.ndarray  # (steps + 1,) float32: the Euler steps' sigmas
    prompt_cache_hit: np.ndarray  # (1,) bool: both embeddings came from the prompt cache


PREPARED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Prepared))

PrepareFn = Callable[[GenerateParams], Prepared]

DEFAULT_PROMPT_CACHE_BYTES = 256 << 20


def _call(fn: ComponentFn, name: str, *args: np.ndarray, **kwargs: np.ndarray) -> np.ndarray:
    out = fn(*args, **kwargs)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} returned {type(out).__name__}, expected a numpy array")
    return out


def _padded_ids(tokenizer, prompt: str, max_length: int) -> np.ndarray:
    """One prompt's ids padded and truncated to `max_length` (FluxPipeline's call), int64."""
    ids = tokenizer(
        [prompt],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_overflowing_tokens=False,
        return_length=False,
        return_tensors="np",
    ).input_ids
    return ids.astype(np.int64)


class FluxPrep:
    """Tokenize, make the seed's noise and the schedule: the part of FluxPipeline that needs
    torch, diffusers and transformers. Kept apart from the loop so that `generate` (reloaded on
    every LoRA swap) imports numpy only; this runs in the `flux_prepare` model, which depends on
    the base checkpoint alone and so is not reloaded when a LoRA changes."""

    def __init__(
        self,
        checkpoint_dir: Path,
        max_sequence_length: int | None = None,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
    ) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTokenizer, T5TokenizerFast

        checkpoint_dir = Path(checkpoint_dir)
        # The classes FluxPipeline declares for these slots, so tokenization is identical.
        self.tokenizer = CLIPTokenizer.from_pretrained(checkpoint_dir / "tokenizer")
        self.tokenizer_2 = T5TokenizerFast.from_pretrained(checkpoint_dir / "tokenizer_2")
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(checkpoint_dir / "scheduler")
        if self.scheduler_config.get("stochastic_sampling", False):
            raise ValueError(
                "stochastic_sampling schedulers are not supported (the loop's Euler step is deterministic)"
            )
        self._scheduler_cls = FlowMatchEulerDiscreteScheduler
        vae_cfg = json.loads((checkpoint_dir / "vae" / "config.json").read_text())
        tr_cfg = json.loads((checkpoint_dir / "transformer" / "config.json").read_text())
        self.vae_scale_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.num_channels_latents = int(tr_cfg["in_channels"]) // 4
        self.clip_max_length = int(self.tokenizer.model_max_length)
        self.max_sequence_length = int(max_sequence_length or read_max_sequence_length(checkpoint_dir))
        if self.max_sequence_length > 512:
            raise ValueError("max_sequence_length cannot exceed 512 (FluxPipeline's limit)")
        self.cache = PromptEmbeddingCache(prompt_cache_bytes)

    def tokenize(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """(CLIP ids (1, 77), T5 ids (1, max_sequence_length)), int64, as FluxPipeline pads them."""
        return _padded_ids(self.tokenizer, prompt, self.clip_max_length), _padded_ids(
            self.tokenizer_2, prompt, self.max_sequence_length
        )

    def initial_latents(self, width: int, height: int, seed: int):
        """Packed noise (1, N, 64) and image ids (N, 3), as FluxPipeline.prepare_latents makes them."""
        import torch
        from diffusers import FluxPipeline
        from diffusers.utils.torch_utils import randn_tensor

        h = 2 * (int(height) // (self.vae_scale_factor * 2))
        w = 2 * (int(width) // (self.vae_scale_factor * 2))
        generator = torch.Generator("cpu").manual_seed(int(seed))
        noise = randn_tensor(
            (1, self.num_channels_latents, h, w), generator=generator, device=torch.device("cpu"), dtype=torch.float32
        )
        latents = FluxPipeline._pack_latents(noise, 1, self.num_channels_latents, h, w)
        ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, torch.device("cpu"), torch.float32)
        return latents, ids

    def timesteps(self, steps: int, image_seq_len: int):
        """A fresh scheduler (it is stateful) and its timesteps for this image size."""
        import torch
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = self._scheduler_cls.from_config(self.scheduler_config)
        cfg = scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, torch.device("cpu"), sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler, timesteps

    def embed(
        self, prompt: str, encode_clip: ComponentFn, encode_t5: ComponentFn, versions: tuple[object, object]
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """(pooled, text, hit): CLIP and T5 embeddings of `prompt`, from the cache when this
        prompt was embedded before by the same encoder versions (`versions`: CLIP's, T5's)."""
        ids: list[np.ndarray] = []

        def token_ids(i: int) -> np.ndarray:
            if not ids:
                ids.extend(self.tokenize(prompt))
            return ids[i]

        pooled, hit_clip = self.cache.get_or_compute(
            (FLUX_TEXT_ENCODER, versions[0], prompt),
            lambda: _call(encode_clip, FLUX_TEXT_ENCODER, token_ids(0)).astype(np.float32, copy=False),
        )
        text, hit_t5 = self.cache.get_or_compute(
            (FLUX_TEXT_ENCODER_2, versions[1], prompt),
            lambda: _call(encode_t5, FLUX_TEXT_ENCODER_2, token_ids(1)).astype(np.float32, copy=False),
        )
        return pooled, text, hit_clip and hit_t5

    def __call__(
        self,
        req: GenerateParams,
        encode_clip: ComponentFn,
        encode_t5: ComponentFn,
        versions: tuple[object, object] = ("in-process", "in-process"),
    ) -> Prepared:
        import torch

        pooled, text, hit = self.embed(req.prompt, encode_clip, encode_t5, versions)
        latents, img_ids = self.initial_latents(req.width, req.height, req.seed)
        scheduler, timesteps = self.timesteps(req.steps, latents.shape[1])
        # Exactly the pipeline's arithmetic: float32 timestep, divided by 1000 in torch.
        t_in = torch.stack([t.expand(1).to(torch.float32) / 1000 for t in timesteps]).reshape(-1)
        return Prepared(
            pooled_embeds=pooled,
            text_embeds=text,
            latents=np.ascontiguousarray(latents.numpy(), dtype=np.float32),
            img_ids=np.ascontiguousarray(img_ids.numpy()[None], dtype=np.float32),
            timesteps=np.ascontiguousarray(t_in.numpy(), dtype=np.float32),
            sigmas=np.ascontiguousarray(scheduler.sigmas.to(torch.float32).numpy(), dtype=np.float32),
            prompt_cache_hit=np.array([hit], dtype=np.bool_),
        )


class FluxLoop:
    """Encode, denoise and decode one prompt; returns uint8 (H, W, 3).

    Numpy only: the request's prompt embeddings, noise and schedule come from `prepare` (in
    Triton, a BLS call to `flux_prepare`; by default a FluxPrep in this process, calling this
    loop's encoders through its prompt cache). The Euler step and the
    latent unpacking are FlowMatchEulerDiscreteScheduler.step and FluxPipeline._unpack_latents
    in float32 numpy, bit for bit (tests/unit/test_flux_loop.py proves it against the pipeline)."""

    def __init__(
        self,
        checkpoint_dir: Path,
        encode_clip: ComponentFn,
        encode_t5: ComponentFn,
        transformer: ComponentFn,
        decode_vae: ComponentFn,
        max_sequence_length: int | None = None,
        prepare: PrepareFn | None = None,
    ) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_dir = checkpoint_dir
        self.encode_clip, self.encode_t5 = encode_clip, encode_t5
        self.transformer, self.decode_vae = transformer, decode_vae
        vae_cfg = json.loads((checkpoint_dir / "vae" / "config.json").read_text())
        self.vae_scale_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.scaling_factor = np.float32(vae_cfg["scaling_factor"])
        self.shift_factor = np.float32(vae_cfg.get("shift_factor") or 0.0)
        self.max_sequence_length = int(max_sequence_length or read_max_sequence_length(checkpoint_dir))
        if prepare is None:
            prep = FluxPrep(checkpoint_dir, self.max_sequence_length)
            prepare = lambda req: prep(req, self.encode_clip, self.encode_t5)  # noqa: E731
        self.prepare: PrepareFn = prepare

    def unpack(self, latents: np.ndarray, width: int, height: int) -> np.ndarray:
        """FluxPipeline._unpack_latents: (1, N, C*4) -> (1, C, h, w)."""
        b, _, channels = latents.shape
        h = 2 * (int(height) // (self.vae_scale_factor * 2))
        w = 2 * (int(width) // (self.vae_scale_factor * 2))
        x = latents.reshape(b, h // 2, w // 2, channels // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
        return x.reshape(b, channels // 4, h, w)

    def decode(self, latents: np.ndarray, width: int, height: int) -> np.ndarray:
        """Unpack, un-normalise, decode and post-process (denormalise, round) to uint8 (H, W, 3)."""
        latents = (self.unpack(latents, width, height) / self.scaling_factor) + self.shift_factor
        images = _call(self.decode_vae, FLUX_VAE_DECODER, np.ascontiguousarray(latents, dtype=np.float32))
        # VaeImageProcessor.postprocess(output_type="np"), then numpy_to_pil's conversion: what
        # output_type="pil" (and so any saved PNG) would hold.
        floats = np.clip(images.astype(np.float32, copy=False) / np.float32(2) + np.float32(0.5), 0, 1)
        return (floats[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)

    def __call__(
        self,
        req: GenerateParams,
        on_step: Callable[[int, int], None] | None = None,
        transformer_extra: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """`transformer_extra`: inputs added to every transformer call by name (the adapter branch's
        `adapter` and `adapter_scale`, serving/adapter_choice.py)."""
        extra = dict(transformer_extra or {})
        p = self.prepare(req)
        pooled, text = p.pooled_embeds, p.text_embeds
        latents = np.asarray(p.latents, dtype=np.float32)
        # Constant over the steps; batch-major copies of the 2-D ids the pipeline passes.
        fixed = {
            "encoder_hidden_states": text,
            "pooled_projections": pooled,
            "img_ids": p.img_ids,
            "txt_ids": np.zeros((1, text.shape[1], 3), dtype=np.float32),
            # A model without guidance embedding (schnell) ignores it; the contract still has it.
            "guidance": np.full((1,), req.guidance, dtype=np.float32),
        }
        names = FLUX_IO_NAMES[FLUX_TRANSFORMER][0]
        total = len(p.timesteps)
        for i in range(total):
            feeds = fixed | {"hidden_states": latents, "timestep": p.timesteps[i : i + 1]}
            noise = np.asarray(
                _call(self.transformer, FLUX_TRANSFORMER, *(feeds[n] for n in names), **extra), dtype=np.float32
            )
            latents = latents + (p.sigmas[i + 1] - p.sigmas[i]) * noise  # the scheduler's Euler step
            if on_step is not None:
                on_step(i + 1, total)
        return self.decode(latents, req.width, req.height)


# ----------------------------------------------------------------------------- backends


def ort_callables(
    onnx_dir: Path, intra_op_threads: int = 0, providers: list[str] | None = None
) -> tuple[ComponentFn, ComponentFn, ComponentFn, ComponentFn]:
    """(encode_clip, encode_t5, transformer, decode_vae) on ONNX Runtime sessions.

    Reads `onnx_dir/<model name>/model.onnx` as written by export.flux.onnx_export.export_all.
    intra_op_threads=0 lets ONNX Runtime pick (all cores).
    """
    from common.adapter_bank import zero_branch_feeds
    from common.ort_session import make_session

    def make(name: str) -> ComponentFn:
        # Spinning on: in-process use owns the cores (Triton's stubs turn it off).
        session = make_session(Path(onnx_dir) / name / "model.onnx", intra_op_threads, providers, spinning=True)
        input_names, (output_name,) = FLUX_IO_NAMES[name]
        # An exporter may drop an input the graph never reads (guidance without guidance embedding).
        present = {i.name for i in session.get_inputs()}
        input_names = tuple(n for n in input_names if n in present)
        graph_inputs = session.get_inputs()

        def run(*args: np.ndarray, **kwargs: np.ndarray) -> np.ndarray:
            feeds = dict(zip(input_names, args)) | kwargs
            feeds = {n: feeds[n] for n in input_names}
            # The transformer with the adapter branch, run here without adapters: slot 0 everywhere.
            feeds |= zero_branch_feeds(graph_inputs, next(iter(feeds.values())).shape[0])
            return session.run([output_name], feeds)[0]

        return run

    return (make(FLUX_TEXT_ENCODER), make(FLUX_TEXT_ENCODER_2), make(FLUX_TRANSFORMER), make(FLUX_VAE_DECODER))


def torch_callables(pipeline) -> tuple[ComponentFn, ComponentFn, ComponentFn, ComponentFn]:
    """(encode_clip, encode_t5, transformer, decode_vae) on a loaded FluxPipeline's modules.

    The reference backend: with it, FluxLoop must reproduce the pipeline bit for bit, which
    separates loop bugs from export error.
    """
    import torch

    def as_dict(name: str, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        feeds = dict(zip(FLUX_IO_NAMES[name][0], args)) | kwargs
        return {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}

    @torch.no_grad()
    def clip(*args, **kwargs) -> np.ndarray:
        ids = as_dict(FLUX_TEXT_ENCODER, args, kwargs)["input_ids"]
        return pipeline.text_encoder(ids, output_hidden_states=False).pooler_output.float().numpy()

    @torch.no_grad()
    def t5(*args, **kwargs) -> np.ndarray:
        ids = as_dict(FLUX_TEXT_ENCODER_2, args, kwargs)["input_ids"]
        return pipeline.text_encoder_2(ids, output_hidden_states=False)[0].float().numpy()

    @torch.no_grad()
    def transformer(*args, **kwargs) -> np.ndarray:
        f = as_dict(FLUX_TRANSFORMER, args, kwargs)
        return (
            pipeline.transformer(
                hidden_states=f["hidden_states"],
                encoder_hidden_states=f["encoder_hidden_states"],
                pooled_projections=f["pooled_projections"],
                timestep=f["timestep"],
                img_ids=f["img_ids"][0],
                txt_ids=f["txt_ids"][0],
                return_dict=False,
                guidance=f["guidance"] if pipeline.transformer.config.guidance_embeds else None,
            )[0]
            .float()
            .numpy()
        )

    @torch.no_grad()
    def vae(*args, **kwargs) -> np.ndarray:
        latent = as_dict(FLUX_VAE_DECODER, args, kwargs)["latent"]
        return pipeline.vae.decode(latent, return_dict=False)[0].float().numpy()

    return clip, t5, transformer, vae
