"""The baseline's FLUX: a diffusers FluxPipeline of the same checkpoint + LoRA that `generate` serves.

Sources and loading come from the export code (export.flux: `FluxSettings` says which checkpoint and
LoRA, `load_pipeline` loads and fuses), so the baseline and the served model cannot be built from
different weights. When that code or the local build is missing, generation is unavailable and
the benchmark skips the baseline's generate target with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.flux_assets import read_max_sequence_length

log = logging.getLogger(__name__)


class FluxUnavailable(RuntimeError):
    """No FLUX pipeline can be built here (export.flux missing, or the local build not done)."""


@dataclass(frozen=True)
class FluxSource:
    checkpoint: str
    lora: str | None
    lora_scale: float
    lora_weight_name: str | None
    trigger_word: str
    max_sequence_length: int


def flux_source() -> FluxSource:
    """What `generate` is exported from, per export.flux's settings (env FLUXSERVE_FLUX_)."""
    try:
        from export.flux.settings import FluxSettings
    except ImportError as e:
        raise FluxUnavailable(f"export.flux is not available: {e}") from e
    s = FluxSettings()
    checkpoint = s.base_model or str(s.local_checkpoint_dir)
    lora = s.lora or (str(s.local_lora_dir) if s.base_model is None else None)
    for local in (p for p in (checkpoint, lora) if p and (p.startswith("/") or p.startswith("."))):
        if not Path(local).exists():
            raise FluxUnavailable(f"{local} is not built (run `make models`)")
    max_len = s.max_sequence_length or read_max_sequence_length(checkpoint)
    return FluxSource(checkpoint, lora, s.lora_scale, s.lora_weight_name, s.trigger_word, max_len)


def flux_available() -> str | None:
    """None when the baseline can build a FLUX pipeline, else the reason it cannot."""
    try:
        flux_source()
    except FluxUnavailable as e:
        return str(e)
    return None


def load_flux_pipeline() -> tuple[Any, FluxSource]:
    """A diffusers FluxPipeline on CPU in float32 with the LoRA fused, and where it came from."""
    try:
        from export.flux.lora import load_pipeline
    except ImportError as e:
        raise FluxUnavailable(f"export.flux.lora is not available: {e}") from e
    source = flux_source()
    pipe = load_pipeline(source.checkpoint, source.lora, source.lora_scale, weight_name=source.lora_weight_name)
    log.info("baseline FLUX pipeline from %s + LoRA %s (scale %g)", source.checkpoint, source.lora, source.lora_scale)
    return pipe, source
