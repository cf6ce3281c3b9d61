"""The cost model of a request: what admission control, the memory guard and the overload
benchmark count.

Generation cost is measured in megapixel-steps (width x height x steps x images / 1e6): the
transformer's work per step grows with the number of latent tokens, i.e. with pixels, and every
image of a request runs its own loop. Classification cost is the number of texts.

The memory guard estimates the FLUX transformer's peak activation memory: full self-attention
over image + text tokens materialises a (heads, tokens, tokens) score matrix and its softmax per
image (ONNX Runtime on CPU keeps both alive), which dominates everything else at large sizes. The
deployed `generate` model publishes its transformer's head count and text length as config
parameters (contract.specs's ATTENTION_HEADS_PARAMETER, TEXT_TOKENS_PARAMETER), so the guard follows the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from contract.specs import GENERATE_LIMITS

LATENT_PATCH_PIXELS = 16
"""One image token covers 16x16 pixels (8x VAE downsampling, 2x2 patch packing)."""
FLOAT_BYTES = 4
ATTENTION_COPIES = 2
"""Score matrix and its softmax are alive together inside one attention call."""


def generate_cost_mps(width: int, height: int, steps: int, images: int = 1) -> float:
    """Megapixel-steps of a /generate request."""
    return width * height * steps * images / 1e6


MAX_CONTRACT_COST_MPS = generate_cost_mps(
    GENERATE_LIMITS.max_side, GENERATE_LIMITS.max_side, GENERATE_LIMITS.max_steps, GENERATE_LIMITS.max_num_images
)
"""The largest request the contract's per-field limits allow (the GPU deployment's maximum)."""


@dataclass(frozen=True)
class TransformerShape:
    """What the memory estimate needs to know about the deployed FLUX transformer."""

    attention_heads: int = 24
    text_tokens: int = 512
    """FLUX.1-dev's values, used when the deployed model does not publish its own."""


def image_tokens(width: int, height: int) -> int:
    return (width // LATENT_PATCH_PIXELS) * (height // LATENT_PATCH_PIXELS)


def transformer_peak_bytes(width: int, height: int, images: int, shape: TransformerShape) -> int:
    """Estimated peak activation memory of the transformer running `images` such images as one
    batch (the images of one request run concurrently and meet in the dynamic batcher)."""
    tokens = image_tokens(width, height) + shape.text_tokens
    return images * shape.attention_heads * tokens * tokens * FLOAT_BYTES * ATTENTION_COPIES


CPU_HOST_MEMORY_SHARE = 0.25
"""On a CPU deployment, `generate` and `generate_stream` may each use a quarter of the host's
memory for transformer activations (half together, as the facade's default budget)."""


def host_memory_bytes() -> int:
    """Physical memory of this host (the machine the code runs on)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def instance_memory_budget(share: float, instances: int) -> int | None:
    """Bytes of transformer activations one `generate` instance's image may use (None: no guard):
    the model's share of the host's memory split over its instances, which may all run at once."""
    return int(host_memory_bytes() * share / max(1, instances)) if share > 0 else None


def memory_guard_message(needed: int, budget: int) -> str:
    return (
        f"this request needs about {needed / 2**20:,.0f} MiB of transformer memory, over this deployment's limit "
        f"of {budget / 2**20:,.0f} MiB: use a smaller width x height or fewer num_images"
    )
