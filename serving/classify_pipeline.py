"""Tokenization and post-processing for the `classify` model (plain Python, unit-testable).

The version folder of `classify` holds `tokenizer/` (Hugging Face format) and `labels.json`
(label order, the text normalization the model was trained with, the calibration temperature and
the recommended uncertainty threshold, both measured on the validation split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from common.chat_text import LABELS_KEY, RAW, normalized, normalizer
from contract.specs import CLASSIFY_LIMITS, LABELS


@dataclass(frozen=True)
class LabelInfo:
    labels: tuple[str, ...]
    threshold: float
    temperature: float = 1.0
    """Logits are divided by it before the softmax (fitted on the validation split at training):
    calibrated scores are what make the uncertainty threshold meaningful."""
    text_normalization: str = RAW
    """What the model was trained to read (common/chat_text.py); absent in older models: raw text."""

    @classmethod
    def load(cls, path: Path) -> LabelInfo:
        data = json.loads(path.read_text())
        labels = tuple(data["labels"])
        if labels != LABELS:
            raise ValueError(f"model labels {labels} do not match the contract {LABELS}")
        temperature = float(data.get("temperature", 1.0))
        if not temperature > 0:
            raise ValueError(f"calibration temperature must be positive, got {temperature}")
        text_normalization = data.get(LABELS_KEY) or RAW
        normalizer(text_normalization)  # an unknown name fails the model's load, not its first request
        return cls(labels, float(data.get("recommended_threshold", 0.5)), temperature, text_normalization)


class ClassifyPipeline:
    def __init__(
        self, version_dir: Path, max_tokens: int = CLASSIFY_LIMITS.max_tokens, tokenizer_dir: Path | None = None
    ) -> None:
        """`tokenizer_dir`: where the tokenizer lies when not in `version_dir/tokenizer` (a trained
        model's own folder, as the in-process benchmark reads it)."""
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or version_dir / "tokenizer")
        self.labels = LabelInfo.load(version_dir / "labels.json")
        self.max_tokens = max_tokens
        self._normalize = normalizer(self.labels.text_normalization)
        # The Rust tokenizer underneath, configured once as the Hugging Face wrapper would configure
        # it on every call: the wrapper's per-call Python (argument checks, BatchEncoding, tensor
        # conversion) was a third of the tokenization cost of a dynamic batch.
        self._fast = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        self._fast.enable_truncation(max_tokens)
        # Pad to the longest in the batch (not to max_tokens): chat messages are short, and padding
        # to 128 would multiply encoder work several times over.
        self._fast.enable_padding(
            direction=self.tokenizer.padding_side,
            pad_id=self.tokenizer.pad_token_id,
            pad_token=self.tokenizer.pad_token,
        )

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The whole dynamic batch in one call (no offsets computed: nothing here uses them)."""
        encodings = self._fast.encode_batch_fast(normalized(texts, self._normalize))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }

    def postprocess(self, logits: np.ndarray) -> tuple[list[str], np.ndarray]:
        probs = calibrated_softmax(logits, self.labels.temperature)
        return [self.labels.labels[i] for i in probs.argmax(axis=1)], probs


def calibrated_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) as float32; T > 1 softens the over-confident raw scores."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs.astype(np.float32)


def validate_text(text: str) -> str | None:
    """Error message for a text the model must not see, or None when it is fine."""
    if not text.strip():
        return "text must not be empty"
    if len(text) > CLASSIFY_LIMITS.max_text_chars:
        return f"text longer than {CLASSIFY_LIMITS.max_text_chars} characters"
    return None
