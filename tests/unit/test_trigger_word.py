"""The trigger-word rule (common/trigger_word.py) that training captions and facade prompts share."""

from __future__ import annotations

import pytest

from common.trigger_word import has_trigger, with_trigger


@pytest.mark.parametrize(
    ("text", "trigger", "present"),
    [
        ("zxq, a dog", "zxq", True),
        ("a ZXQ dog", "zxq", True),
        ("a zxq-style dog", "zxq", True),  # a hyphen ends a word
        ("a dog (zxq)", "zxq", True),
        ("a dog zxq", "zxq", True),
        ("azxq dog", "zxq", False),  # inside another word: not the trigger
        ("zxqfoo dog", "zxq", False),
        ("a_zxq dog", "zxq", False),  # underscore is a word character
        ("super realism, a cat", "Super Realism", True),
        ("super  realism, a cat", "Super Realism", False),  # a phrase is matched as written
        ("superrealism, a cat", "Super Realism", False),
        ("a <lora> cat", "<lora>", True),  # regex characters in the trigger are literal
        ("a lora cat", "<lora>", False),
        ("a c.t", "c+t", False),
        ("café au lait", "caf", False),  # unicode letters are word characters too
        ("", "zxq", False),
    ],
)
def test_whole_word_any_case(text: str, trigger: str, present: bool) -> None:
    assert has_trigger(text, trigger) is present


@pytest.mark.parametrize(
    ("text", "trigger", "expected"),
    [
        ("a dog", "zxq", "zxq, a dog"),
        ("a ZXQ dog", "zxq", "a ZXQ dog"),
        ("azxq dog", "zxq", "zxq, azxq dog"),
        ("", "zxq", "zxq"),
        ("   ", "zxq", "zxq"),
        ("a dog", "", "a dog"),
        ("a  dog\n", "zxq", "zxq, a  dog\n"),  # the text itself is never rewritten
    ],
)
def test_with_trigger(text: str, trigger: str, expected: str) -> None:
    assert with_trigger(text, trigger) == expected
