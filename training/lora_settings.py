"""The user-facing LoRA training settings, apart from the trainer: the facade validates uploads
against them on every POST /train and must not import torch to do so."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class LoraTrainSettings(BaseModel):
    """User-facing training settings (the API exposes these fields and their ranges)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(30, ge=1, le=5000)
    rank: int = Field(4, ge=1, le=128)
    alpha: float | None = Field(None, gt=0, le=1024)
    """LoRA alpha; None means `rank` (a LoRA scale of 1, as the DreamBooth script does)."""
    learning_rate: float = Field(1e-3, gt=0, le=1)
    resolution: int = Field(64, ge=64, le=1024)
    batch_size: int = Field(1, ge=1, le=8)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    guidance: float = Field(1.0, ge=0, le=20)
    """Fed to FLUX's guidance embedding during training, as `guidance_scale` is at generation."""

    @field_validator("resolution")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        # The 8x VAE downsampling followed by 2x2 packing needs sides divisible by 16.
        if v % 16:
            raise ValueError("resolution must be a multiple of 16")
        return v

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)
