"""The one rule for "this text already carries the LoRA's trigger word", used where training
captions are written (training.lora_dataset) and where the facade leads a prompt with the serving
LoRA's trigger (api.state): a prompt means the same to both only if both decide the same way."""

from __future__ import annotations

import re


def has_trigger(text: str, trigger_word: str) -> bool:
    """`trigger_word` appears in `text` as a whole word (or phrase), in any case: "zxq" inside
    "zxqfoo" or "azxq" is a different word and does not count."""
    pattern = r"(?<!\w)" + re.escape(trigger_word) + r"(?!\w)"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def with_trigger(text: str, trigger_word: str) -> str:
    """`text` led by `trigger_word` ("<trigger>, <text>") unless it already has it; a blank text
    becomes the trigger word alone, an empty trigger word leaves the text as it is."""
    if not trigger_word or has_trigger(text, trigger_word):
        return text
    if not text.strip():
        return trigger_word
    return f"{trigger_word}, {text}"
