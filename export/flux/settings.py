"""Where FLUX comes from: the real FLUX.1-dev + Super-Realism LoRA, or a local random-weight build.

Environment prefix: FLUXSERVE_FLUX_ (read only when `FluxSettings()` is instantiated, never at
import). The default is the local build because there are no hub downloads in CI; the production
configuration sets `base_model` / `lora` to the hub ids below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.flux_assets import DEFAULT_MAX_SEQUENCE_LENGTH
from common.paths import BUILD_DIR
from contract.specs import DEFAULT_TRIGGER_WORD

REAL_BASE_MODEL = "black-forest-labs/FLUX.1-dev"
"""The production base model (12B-parameter transformer, guidance-distilled)."""
REAL_LORA = "strangerzonehf/Flux-Super-Realism-LoRA"
REAL_LORA_WEIGHT_NAME = "super-realism.safetensors"
"""The file inside REAL_LORA; the repository also holds images, so name it explicitly."""
TRIGGER_WORD = DEFAULT_TRIGGER_WORD

REAL_T5_MAX_SEQUENCE_LENGTH = DEFAULT_MAX_SEQUENCE_LENGTH
LOCAL_T5_MAX_SEQUENCE_LENGTH = 64
"""The local models' T5 context: short, because text tokens join every attention call."""

LocalSize = Literal["tiny", "small"]

EXPORT_MARKER = "export.json"
"""Written last into an ONNX export folder (`FluxSettings.export_root/<component>/<fingerprint>/`):
its presence means the export (or patch) is complete."""


class FluxSettings(BaseSettings):
    """Sources and build locations for the FLUX pipeline."""

    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_FLUX_")

    base_model: str | None = None
    """Hub id or local directory of a diffusers FLUX pipeline; None = the local random build."""
    lora: str | None = None
    """Hub id, directory or .safetensors file of a LoRA; None = the local random LoRA."""
    lora_weight_name: str | None = None
    """File inside a hub/directory LoRA (REAL_LORA_WEIGHT_NAME for the real one)."""
    lora_scale: float = 1.0
    trigger_word: str = TRIGGER_WORD
    local_size: LocalSize = "small"
    local_seed: int = 0
    build_dir: Path = BUILD_DIR / "flux"
    max_sequence_length: int | None = None
    """T5 tokens per prompt; None = what the checkpoint's marker says (512 for hub models)."""
    onnx_opset: int = 18
    transformer_precision: Literal["auto", "fp32", "int8"] = "auto"
    """CPU target: serve the transformer in int8 when measured close to fp32 and faster (auto), or
    force one (export.flux.transformer_precision). The GPU target always exports fp32."""
    adapter_branch: bool = True
    """CPU and gpu-torch targets: serve the transformer with the adapter branch (issue 27: published
    LoRAs chosen per request; export.flux.adapter_bank's graph on CPU, serving/torch_adapters.py's
    hooks on gpu-torch); slot 0, a request without one, is the default model. The TensorRT target
    keeps the plain graph."""
    adapter_rank: int = Field(16, ge=1, le=128)
    """The bank's R: the largest LoRA rank an adapter may have (smaller ranks are zero-padded)."""
    adapter_layout: Literal["per_layer", "grouped"] = "grouped"
    """How the bank's layers are packed into graph inputs (`fluxserve-bench adapters` measures both)."""
    weight_patching: bool = True
    """Publish a LoRA by patching the base export's weights (seconds) instead of fusing it and
    re-exporting the component (a full trace); falls back to re-exporting what cannot be patched."""

    @property
    def export_root(self) -> Path:
        """ONNX exports, one folder per component and fingerprint of what it was built from."""
        return self.build_dir / "export"

    @property
    def local_checkpoint_dir(self) -> Path:
        return self.build_dir / f"checkpoint-{self.local_size}-{self.local_seed}"

    @property
    def local_lora_dir(self) -> Path:
        return self.build_dir / f"lora-{self.local_size}-{self.local_seed}"

    @classmethod
    def real(cls) -> FluxSettings:
        """The production configuration: FLUX.1-dev with the Super-Realism LoRA fused in."""
        return cls(
            base_model=REAL_BASE_MODEL,
            lora=REAL_LORA,
            lora_weight_name=REAL_LORA_WEIGHT_NAME,
            max_sequence_length=REAL_T5_MAX_SEQUENCE_LENGTH,
        )
