"""The labeled dataset: size, labels, hard cases, and a split that keeps them in every part."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from contract.specs import LABELS
from training.classifier_data import (
    DATA_DIR,
    load_examples,
    load_held_out,
    load_train_only,
    stratified_split,
    training_splits,
)

HARD_TAGS = ("indirect", "short", "followup", "bare_prompt", "visual_words")


def test_dataset_is_large_varied_and_balanced() -> None:
    examples = load_examples()
    assert len(examples) >= 600
    labels = Counter(e.label for e in examples)
    assert set(labels) == set(LABELS)
    assert min(labels.values()) / max(labels.values()) > 0.7
    tags = Counter(e.tag for e in examples)
    for tag in HARD_TAGS:
        assert tags[tag] >= 30, f"too few {tag!r} examples: {tags[tag]}"
    # Not template-generated: no three-word opening accounts for more than 2.5% of messages.
    openings = Counter(" ".join(e.text.lower().split()[:3]) for e in examples)
    assert openings.most_common(1)[0][1] <= 0.025 * len(examples), openings.most_common(3)


def test_labels_of_known_hard_cases_if_present() -> None:
    """Where the prototype's hard cases appear in the data, they carry the prototype's labels."""
    expected = {
        "can i see you in the kitchen?": "image_request",
        "make an image of you in paris": "image_request",
        "see you tomorrow": "conversation",
        "i took a nice picture yesterday": "conversation",
        "show me how to cook pasta": "conversation",
    }
    for e in load_examples():
        key = e.text.lower().strip().rstrip("!.")
        if key in expected:
            assert e.label == expected[key], e.text


def test_split_is_disjoint_stratified_and_deterministic() -> None:
    examples = load_examples()
    a = stratified_split(examples, seed=0)
    b = stratified_split(examples, seed=0)
    assert [e.text for e in a.test] == [e.text for e in b.test]
    parts = [set(e.text for e in p) for p in (a.train, a.validation, a.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(map(len, parts)) == len(examples)
    test_tags = Counter(e.tag for e in a.test)
    for tag in HARD_TAGS:
        assert test_tags[tag] > 0


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def test_hard_cases_are_many_varied_and_partly_held_out() -> None:
    """Issue 10: >= 200 hand-written hard negatives/positives, a held-out part no split sees."""
    trained = [e for e in load_examples() if e.tag in ("hard_negative", "hard_positive")]
    held = load_held_out()
    assert len(trained) + len(held) >= 200
    assert len(held) >= 40
    assert {e.label for e in held} == set(LABELS)
    assert {e.tag for e in held} == {"hard_negative", "hard_positive"}
    assert not {_key(e.text) for e in held} & {_key(e.text) for e in load_examples()}
    # Hand-written, not templated: no two-word opening starts more than 7% of them ("show me"
    # opens both labels on purpose: it is the ambiguity being taught).
    openings = Counter(" ".join(_key(e.text).split()[:2]) for e in trained + held)
    assert openings.most_common(1)[0][1] <= 0.07 * (len(trained) + len(held)), openings.most_common(3)


def test_issue_examples_are_held_out_with_the_right_labels() -> None:
    held = {_key(e.text): e.label for e in load_held_out()}
    for text in (
        "I'll show you around when you visit",
        "how do you make a selfie stick?",
        "can you show me the way to the station?",
        "tell me more about yourself",
        "see you in the kitchen",
    ):
        assert held[_key(text)] == "conversation", text


def test_held_out_files_do_not_leak_into_the_splits() -> None:
    assert (DATA_DIR / "held_out").is_dir()
    split = stratified_split(load_examples(), seed=0)
    held = {_key(e.text) for e in load_held_out()}
    for part in (split.train, split.validation, split.test):
        assert not held & {_key(e.text) for e in part}


def test_train_only_messages_train_and_change_no_split(tmp_path: Path) -> None:
    """`train_only/` adds to train alone: validation and test stay what the top-level files draw,
    and a train-only copy of a split's or a held-out message is dropped, not trained on."""
    plain = stratified_split(load_examples(), seed=0)
    with_extra = training_splits(seed=0)
    assert [e.text for e in with_extra.validation] == [e.text for e in plain.validation]
    assert [e.text for e in with_extra.test] == [e.text for e in plain.test]
    extra = load_train_only()
    assert len(extra) >= 200
    assert {e.label for e in extra} == set(LABELS)
    assert sorted(e.text for e in with_extra.train) == sorted(e.text for e in plain.train + extra)
    assert [e.text for e in training_splits(seed=0, train_only=False).train] == [e.text for e in plain.train]
    evaluated = {_key(e.text) for e in plain.validation + plain.test + load_held_out()}
    assert not evaluated & {_key(e.text) for e in extra}
    # The guard itself: a train-only line that repeats a test message is dropped.
    for name in ("held_out", "train_only"):
        (tmp_path / name).mkdir()
    (tmp_path / "messages.jsonl").write_text(
        '{"text": "see you tomorrow", "label": "conversation"}\n{"text": "a fox, 8k", "label": "image_request"}\n'
    )
    (tmp_path / "train_only" / "more.jsonl").write_text(
        '{"text": "See  you tomorrow", "label": "conversation"}\n{"text": "a cat, 4k", "label": "image_request"}\n'
    )
    assert [e.text for e in load_train_only(tmp_path)] == ["a cat, 4k"]
    # Not templated either: no three-word opening starts more than 3% of them.
    openings = Counter(" ".join(_key(e.text).split()[:3]) for e in extra)
    assert openings.most_common(1)[0][1] <= 0.03 * len(extra), openings.most_common(3)
