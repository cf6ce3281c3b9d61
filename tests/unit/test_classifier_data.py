"""The labeled dataset: size, labels, hard cases, and a split that keeps them in every part."""

from __future__ import annotations

from collections import Counter

from client.contract import LABELS
from training.classifier_data import load_examples, stratified_split

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
