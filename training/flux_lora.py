"""FLUX LoRA training: the method of diffusers' DreamBooth-LoRA-FLUX example, as a library call.

What it does, and why it matches inference:
- Rectified-flow / flow-matching objective, as FLUX was trained: x_t = (1 - s) * x0 + s * noise,
  and the transformer predicts the velocity `noise - x0`. Timesteps index the checkpoint's own
  FlowMatchEulerDiscreteScheduler table (uniform by default, logit-normal or "mode" optional),
  with the SD3 loss weighting helpers from `diffusers.training_utils`.
- Everything the transformer sees is built the way FluxPipeline builds it at generation time:
  VAE latents normalised with `(z - shift_factor) * scaling_factor`, 2x2 packing
  (`FluxPipeline._pack_latents`), image ids from `_prepare_latent_image_ids`, text embeddings and
  text ids from `FluxPipeline.encode_prompt` with the serving max_sequence_length, `timestep/1000`,
  and the guidance embedding fed with the configured guidance scale. A LoRA trained against
  different conditioning than the server uses would not transfer.
- Only PEFT LoRA adapters on the attention projections train (AdamW, fp32); the VAE, both text
  encoders and the base transformer are frozen, so captions are encoded once and image latent
  distributions are encoded once (a fresh latent sample is still drawn every step).

The result is saved with `FluxPipeline.save_lora_weights`, so `FluxPipeline.load_lora_weights`
(and export.flux.lora.load_pipeline, which fuses it) loads it, plus its manifest (common.flux_assets.LORA_MANIFEST), whose trigger word export reads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageOps

from common.flux_assets import LORA_WEIGHT_NAME, read_max_sequence_length, write_lora_manifest
from training.lora_dataset import PreparedDataset
from training.lora_settings import LoraTrainSettings

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "fluxserve-flux-lora/1"

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
"""What the DreamBooth-LoRA-FLUX script targets by default: the attention projections of the
double-stream blocks (image side) and the q/k/v of the single-stream blocks."""

ProgressCallback = Callable[[dict[str, Any]], None]
StopCallback = Callable[[], bool]


WeightingScheme = Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"]


@dataclass(frozen=True)
class LoraTrainOptions:
    """Knobs the API does not expose; the defaults are the DreamBooth-LoRA-FLUX script's."""

    weighting_scheme: WeightingScheme = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    max_grad_norm: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    max_sequence_length: int | None = None
    """T5 tokens per caption; None = the checkpoint's (what the server pads prompts to)."""
    latent_sampling: Literal["sample", "mode"] = "sample"
    """"sample" draws from the VAE posterior every step (the script, with cached latents);
    "mode" uses its mean. FLUX's real VAE has a narrow posterior, so the two barely differ there;
    a random-weight VAE's posterior std is ~1, which drowns the image in sampling noise."""
    local_files_only: bool = True
    """Never reach for the hub from a training job; the checkpoint must already be on disk."""


# ----------------------------------------------------------------------------- data


def load_image_tensor(path: Path, resolution: int) -> torch.Tensor:
    """(3, R, R) in [-1, 1]: EXIF-rotated, RGB, resized on the short side, centre-cropped."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        # Composite transparency on white rather than letting convert() expose hidden pixels.
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba)
        im = im.convert("RGB")
        im = ImageOps.fit(im, (resolution, resolution), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(resolution, resolution, 3).permute(2, 0, 1).float().div(127.5).sub(1.0)


def _batch_order(count: int, steps: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Indices per step: a fresh permutation per epoch, so every image is seen equally often."""
    stream: list[int] = []
    needed = steps * batch_size
    while len(stream) < needed:
        stream.extend(torch.randperm(count, generator=generator).tolist())
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


@dataclass
class _Conditioning:
    prompt_embeds: torch.Tensor  # (N, L, D)
    pooled: torch.Tensor  # (N, Dp)
    text_ids: torch.Tensor  # (L, 3)


@torch.no_grad()
def _encode_captions(pipe: Any, captions: Sequence[str], max_sequence_length: int) -> tuple[_Conditioning, list[int]]:
    """Each distinct caption encoded once; returns the stack and, per image, its row."""
    unique = list(dict.fromkeys(captions))
    embeds, pooled, text_ids = [], [], None
    for caption in unique:
        e, p, ids = pipe.encode_prompt(
            prompt=caption, prompt_2=caption, device=torch.device("cpu"), max_sequence_length=max_sequence_length
        )
        embeds.append(e)
        pooled.append(p)
        text_ids = ids
    index = {c: i for i, c in enumerate(unique)}
    cond = _Conditioning(torch.cat(embeds), torch.cat(pooled), text_ids)
    return cond, [index[c] for c in captions]


@torch.no_grad()
def _encode_images(vae: Any, images: Sequence[Path], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior per image; a latent is sampled from them every step."""
    means, stds = [], []
    for path in images:
        dist = vae.encode(load_image_tensor(path, resolution).unsqueeze(0)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------- training


def _summarize(losses: list[float], points: int = 20) -> dict[str, Any]:
    """First/last/min and a downsampled curve: enough to judge a run without every step."""
    k = min(5, len(losses))
    stride = max(1, math.ceil(len(losses) / points))
    return {
        "first": losses[0],
        "last": losses[-1],
        "min": min(losses),
        "mean_first_5": sum(losses[:k]) / k,
        "mean_last_5": sum(losses[-k:]) / k,
        "curve": [{"step": i + 1, "loss": losses[i]} for i in range(0, len(losses), stride)],
    }


def _bake_alpha(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Folds alpha/rank into lora_B so the file means the same under any loader.

    Loaders that see no adapter metadata assume alpha == rank; with the scale folded in, that
    assumption is exactly right, and fusing by hand (W + B @ A) needs no extra factor.
    """
    if scale == 1.0:
        return state_dict
    return {k: (v * scale if "lora_B" in k else v) for k, v in state_dict.items()}


def train_lora(
    checkpoint: Path | str,
    dataset: PreparedDataset,
    out_dir: Path,
    settings: LoraTrainSettings,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    *,
    options: LoraTrainOptions = LoraTrainOptions(),
) -> dict[str, Any]:
    """Trains a FLUX transformer LoRA on `dataset` and saves it (plus its manifest) in out_dir.

    `checkpoint` is a diffusers FLUX pipeline directory (or a hub id already in the local cache).
    `on_progress` gets `{"step", "total_steps", "loss", "eta_s", "steps_per_s"}` after every
    step. `should_stop` is polled before every step; when it returns True, InterruptedError is
    raised and nothing is written. Deterministic for `settings.seed` (CPU, fp32); the global torch
    RNG is left untouched. Returns the manifest dict.
    """
    if dataset.count < 1 or len(dataset.captions) != dataset.count:
        raise ValueError("the dataset has no images or its captions do not match its images")
    out_dir = Path(out_dir)
    started = time.monotonic()
    generator = torch.Generator().manual_seed(settings.seed)
    msl = options.max_sequence_length or read_max_sequence_length(checkpoint)

    logger.info(
        "loading FLUX from %s for LoRA training (%d images, %d steps)", checkpoint, dataset.count, settings.steps
    )
    pipe = _load_frozen(checkpoint, options)
    fixed = _encode_once(pipe, dataset, settings, msl)
    transformer = pipe.transformer
    params, optimizer = _add_lora(transformer, settings, options)
    order = _batch_order(dataset.count, settings.steps, settings.batch_size, generator)
    losses, steps_per_s = _train_loop(
        transformer, fixed, order, params, optimizer, settings, options, generator, on_progress, should_stop
    )
    tensors = _save_lora(transformer, out_dir, settings)

    manifest = _manifest(
        checkpoint, dataset, settings, options, losses, steps_per_s, time.monotonic() - started, tensors, msl
    )
    write_lora_manifest(out_dir, manifest)
    logger.info(
        "LoRA saved to %s: loss %.4f -> %.4f, %.2f steps/s",
        out_dir,
        manifest["loss_history"]["mean_first_5"],
        manifest["loss_history"]["mean_last_5"],
        steps_per_s,
    )
    return manifest


@dataclass
class _Fixed:
    """What stays the same across steps: the frozen models' outputs, computed once, and the
    checkpoint's noise schedule."""

    cond: _Conditioning
    caption_row: list[int]
    """Per image, its caption's row in `cond`."""
    latent_mean: torch.Tensor  # (N, C, h, w)
    latent_std: torch.Tensor
    shift: float
    scale: float
    schedule_timesteps: torch.Tensor
    schedule_sigmas: torch.Tensor
    num_train_timesteps: int
    img_ids: torch.Tensor
    guidance: float | None
    """What the guidance embedding is fed; None when the transformer has none."""


def _load_frozen(checkpoint: Path | str, options: LoraTrainOptions) -> Any:
    """The FluxPipeline with every module frozen and in eval mode (LoRA adapters come later)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(checkpoint), dtype=torch.float32, local_files_only=options.local_files_only)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
        module.eval()
    return pipe


def _encode_once(pipe: Any, dataset: PreparedDataset, settings: LoraTrainSettings, msl: int) -> _Fixed:
    """Captions and image latent distributions through the frozen encoders, once; then the text
    encoders are dropped, which frees most of a real model's memory."""
    from diffusers import FluxPipeline

    cond, caption_row = _encode_captions(pipe, dataset.captions, msl)
    latent_mean, latent_std = _encode_images(pipe.vae, dataset.images, settings.resolution)
    pipe.text_encoder = pipe.text_encoder_2 = None
    # Timesteps/sigmas come from the checkpoint's own scheduler table (as in the script), so a
    # checkpoint with a different schedule config trains on its own noise levels. The table is
    # only read, never stepped, so the pipeline's instance can be used as is.
    scheduler = pipe.scheduler
    _, _, lat_h, lat_w = latent_mean.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(settings.batch_size, lat_h // 2, lat_w // 2, "cpu", torch.float32)
    use_guidance = bool(pipe.transformer.config.guidance_embeds)
    return _Fixed(
        cond=cond,
        caption_row=caption_row,
        latent_mean=latent_mean,
        latent_std=latent_std,
        shift=pipe.vae.config.shift_factor or 0.0,
        scale=pipe.vae.config.scaling_factor,
        schedule_timesteps=scheduler.timesteps.clone().float(),
        schedule_sigmas=scheduler.sigmas.clone().float(),
        num_train_timesteps=scheduler.config.num_train_timesteps,
        img_ids=img_ids,
        guidance=settings.guidance if use_guidance else None,
    )


def _add_lora(
    transformer: Any, settings: LoraTrainSettings, options: LoraTrainOptions
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """PEFT LoRA adapters on the target modules, the only trainable parameters, and their AdamW."""
    from peft import LoraConfig

    lora_config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.effective_alpha,
        init_lora_weights="gaussian",
        target_modules=list(options.target_modules),
    )
    # PEFT draws the gaussian lora_A from the global RNG: seed it, but only inside a fork, so a
    # worker's other users of torch's RNG are not disturbed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        transformer.add_adapter(lora_config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"no LoRA parameters: target modules {options.target_modules} matched nothing")
    optimizer = torch.optim.AdamW(
        params,
        lr=settings.learning_rate,
        betas=options.adam_betas,
        weight_decay=options.adam_weight_decay,
        eps=options.adam_eps,
    )
    return params, optimizer


def _train_loop(
    transformer: Any,
    fixed: _Fixed,
    order: list[list[int]],
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    settings: LoraTrainSettings,
    options: LoraTrainOptions,
    generator: torch.Generator,
    on_progress: ProgressCallback | None,
    should_stop: StopCallback | None,
) -> tuple[list[float], float]:
    """One optimizer step per batch of `order`; returns the losses and the final steps/s."""
    transformer.train()
    losses: list[float] = []
    loop_started = time.monotonic()
    steps_per_s = 0.0
    for step, idx in enumerate(order, start=1):
        if should_stop is not None and should_stop():
            logger.info("LoRA training stopped before step %d of %d", step, settings.steps)
            raise InterruptedError(f"training stopped at step {step - 1} of {settings.steps}")
        loss = _flow_matching_loss(transformer, fixed, idx, options, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step}; lower the learning rate")
        losses.append(value)
        elapsed = time.monotonic() - loop_started
        steps_per_s = step / elapsed if elapsed > 0 else 0.0
        if on_progress is not None:
            remaining = settings.steps - step
            on_progress(
                {
                    "step": step,
                    "total_steps": settings.steps,
                    "loss": value,
                    "eta_s": remaining / steps_per_s if steps_per_s else None,
                    "steps_per_s": steps_per_s,
                }
            )
        if step == 1 or step % max(1, settings.steps // 10) == 0:
            logger.info("LoRA step %d/%d loss %.4f (%.2f steps/s)", step, settings.steps, value, steps_per_s)
    transformer.eval()
    return losses, steps_per_s


def _flow_matching_loss(
    transformer: Any, fixed: _Fixed, idx: list[int], options: LoraTrainOptions, generator: torch.Generator
) -> torch.Tensor:
    """The weighted velocity loss on the images `idx`: a fresh latent and noise level per image."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    index = torch.tensor(idx)
    bsz = len(idx)
    _, channels, lat_h, lat_w = fixed.latent_mean.shape
    latents = fixed.latent_mean[index]
    if options.latent_sampling == "sample":
        latents = latents + fixed.latent_std[index] * torch.randn(latents.shape, generator=generator)
    x0 = (latents - fixed.shift) * fixed.scale
    noise = torch.randn(x0.shape, generator=generator)

    u = compute_density_for_timestep_sampling(
        weighting_scheme=options.weighting_scheme,
        batch_size=bsz,
        logit_mean=options.logit_mean,
        logit_std=options.logit_std,
        mode_scale=options.mode_scale,
        generator=generator,
    )
    t_index = (u * fixed.num_train_timesteps).long().clamp(0, fixed.num_train_timesteps - 1)
    timesteps = fixed.schedule_timesteps[t_index]
    sigmas = fixed.schedule_sigmas[t_index].view(bsz, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise

    rows = torch.tensor([fixed.caption_row[i] for i in idx])
    pred = transformer(
        hidden_states=FluxPipeline._pack_latents(noisy, bsz, channels, lat_h, lat_w),
        timestep=timesteps / 1000,
        guidance=torch.full((bsz,), fixed.guidance) if fixed.guidance is not None else None,
        pooled_projections=fixed.cond.pooled[rows],
        encoder_hidden_states=fixed.cond.prompt_embeds[rows],
        txt_ids=fixed.cond.text_ids,
        img_ids=fixed.img_ids,
        return_dict=False,
    )[0]
    # Compared in packed space: packing is a permutation, so the mean squared error is the
    # same as after unpacking, and one reshape is saved per step.
    target = FluxPipeline._pack_latents(noise - x0, bsz, channels, lat_h, lat_w)
    weighting = compute_loss_weighting_for_sd3(options.weighting_scheme, sigmas=sigmas).view(bsz, 1, 1)
    return (weighting * (pred.float() - target) ** 2).reshape(bsz, -1).mean(dim=1).mean()


def _save_lora(transformer: Any, out_dir: Path, settings: LoraTrainSettings) -> int:
    """The adapters' weights, alpha/rank baked in, as FluxPipeline.save_lora_weights writes them;
    returns the number of tensors."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    state = _bake_alpha(get_peft_model_state_dict(transformer), settings.effective_alpha / settings.rank)
    out_dir.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        out_dir, transformer_lora_layers=state, weight_name=LORA_WEIGHT_NAME, safe_serialization=True
    )
    return len(state)


def _manifest(
    checkpoint: Path | str,
    dataset: PreparedDataset,
    settings: LoraTrainSettings,
    options: LoraTrainOptions,
    losses: list[float],
    steps_per_s: float,
    duration_s: float,
    tensors: int,
    max_sequence_length: int,
) -> dict[str, Any]:
    import diffusers
    import peft

    return {
        "format": MANIFEST_FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "trigger_word": dataset.trigger_word,
        "base_checkpoint": str(checkpoint),
        "lora_file": LORA_WEIGHT_NAME,
        "lora_tensors": tensors,
        # The file has alpha/rank folded into lora_B: load it at scale 1.0 with any loader.
        "alpha_baked_into_weights": True,
        "settings": {**settings.model_dump(), "alpha": settings.effective_alpha},
        "options": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()},
            "max_sequence_length": max_sequence_length,
        },
        "dataset": {"sha256": dataset.sha256, "count": dataset.count},
        "final_loss": losses[-1],
        "loss_history": _summarize(losses),
        "steps_per_s": steps_per_s,
        "duration_s": duration_s,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    }
