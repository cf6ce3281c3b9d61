"""What the classifier does to a chat message before tokenizing it, in training and serving alike.

all-MiniLM-L6-v2's WordPiece vocabulary has no emoji: every one becomes [UNK], so "selfie now 📸"
and "selfie now 😭" are the same input, and a message of emoji alone carries no signal. Chat is
full of them (about one labeled message in ten here), so emoji are spelled out in words first,
with their CLDR names: "selfie now 📸" -> "selfie now camera with flash".

A model records the normalization it was trained with (`labels.json`, `text_normalization`);
serving and every evaluation apply exactly that one, so a model trained before this existed (no
entry) or with `none` keeps reading raw text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import emoji

EMOJI_AS_WORDS = "emoji-as-words"
RAW = "none"
LABELS_KEY = "text_normalization"
"""Where a trained model's `labels.json` records the normalization it was trained with."""


def _spell(chars: str, data: dict) -> str:
    return " " + data["en"].strip(":").replace("_", " ") + " "


def emoji_as_words(text: str) -> str:
    """Each emoji (ZWJ sequences and skin tones included) replaced by its English name."""
    if text.isascii():  # no emoji possible; most messages take this path, at almost no cost
        return text
    return emoji.replace_emoji(text, replace=_spell)


NORMALIZERS: dict[str, Callable[[str], str]] = {EMOJI_AS_WORDS: emoji_as_words}


def normalizer(name: str | None) -> Callable[[str], str] | None:
    """The function a model's recorded `text_normalization` names; None for raw text."""
    if name is None or name == RAW:
        return None
    try:
        return NORMALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown text normalization {name!r}; known: {sorted(NORMALIZERS)} or {RAW!r}") from None


def recorded_normalizer(labels_json: Path) -> Callable[[str], str] | None:
    """The normalization a model folder's (or a `classify` version's) labels.json records."""
    return normalizer(json.loads(Path(labels_json).read_text()).get(LABELS_KEY))


def normalized(texts: list[str], normalize: Callable[[str], str] | None) -> list[str]:
    return texts if normalize is None else [normalize(t) for t in texts]
