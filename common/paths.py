"""Where the project's folders are. Settings classes take their defaults from here."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
"""The Triton repository: committed model.py sources, generated configs and versions."""
BUILD_DIR = PROJECT_ROOT / "build"
"""Generated artifacts (checkpoints, ONNX exports, jobs, logs); never committed."""
CLASSIFIER_MODEL_DIR = BUILD_DIR / "classifier" / "model"
"""Where `fluxserve-train classifier` writes the fine-tuned classifier and export reads it."""
