"""Tokenization and post-processing for the `classify` model (plain Python, unit-testable).

The version folder of `classify` holds `tokenizer/` (Hugging Face format) and `labels.json`
(label order and the recommended uncertainty threshold measured on the validation split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from client.contract import CLASSIFY_LIMITS, LABELS


@dataclass(frozen=True)
class LabelInfo:
    labels: tuple[str, ...]
    threshold: float

    @classmethod
    def load(cls, path: Path) -> LabelInfo:
        data = json.loads(path.read_text())
        labels = tuple(data["labels"])
        if labels != LABELS:
            raise ValueError(f"model labels {labels} do not match the contract {LABELS}")
        return cls(labels, float(data.get("recommended_threshold", 0.5)))


class ClassifyPipeline:
    def __init__(self, version_dir: Path, max_tokens: int = CLASSIFY_LIMITS.max_tokens) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(version_dir / "tokenizer")
        self.labels = LabelInfo.load(version_dir / "labels.json")
        self.max_tokens = max_tokens

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        # Pad to the longest in this batch (not to max_tokens): chat messages are short, and
        # padding to 128 would multiply encoder work several times over.
        enc = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="np"
        )
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}

    def postprocess(self, logits: np.ndarray) -> tuple[list[str], np.ndarray]:
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        return [self.labels.labels[i] for i in probs.argmax(axis=1)], probs.astype(np.float32)


def validate_text(text: str) -> str | None:
    """Error message for a text the model must not see, or None when it is fine."""
    if not text.strip():
        return "text must not be empty"
    if len(text) > CLASSIFY_LIMITS.max_text_chars:
        return f"text longer than {CLASSIFY_LIMITS.max_text_chars} characters"
    return None
