"""Bounds of the classifier fine-tuning settings a caller may choose (a POST /train classifier job),
apart from the trainer: the facade validates them on every request and must not import torch.

The same bounds apply to `ClassifierTrainSettings` (training/classifier.py), so a setting out of
range fails the same way from the environment, the CLI and the API.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Epochs = Annotated[int, Field(ge=1, le=50)]
BatchSize = Annotated[int, Field(ge=1, le=256)]
LearningRate = Annotated[float, Field(ge=1e-7, le=1e-2, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class ClassifierJobParams(BaseModel):
    """What a classifier job may override; the rest come from the worker's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: Epochs | None = None
    batch_size: BatchSize | None = None
    learning_rate: LearningRate | None = None
    seed: Seed | None = None
