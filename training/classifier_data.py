"""The labeled chat-message dataset: loading, de-duplication and a stratified split."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from common.paths import PROJECT_ROOT
from contract.specs import LABELS

DATA_DIR = PROJECT_ROOT / "data" / "classifier"
HELD_OUT_DIR = DATA_DIR / "held_out"
"""Hand-written hard cases kept out of training, validation and test alike: `load_examples` reads
only the top-level files, so these judge the finished model on messages no split has seen."""
TRAIN_ONLY_DIR = DATA_DIR / "train_only"
"""Hand-written messages that only ever train. The top-level files alone decide the validation
and test splits, so adding here changes no split: a model trained with more data is scored on
exactly the messages the one before it was."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    tag: str = ""

    @property
    def label_id(self) -> int:
        return LABELS.index(self.label)


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


def _key(text: str) -> str:
    """What makes two messages the same one: case and spacing do not."""
    return " ".join(text.lower().split())


def load_examples(data_dir: Path = DATA_DIR) -> list[Example]:
    """Every `*.jsonl` file under data_dir; duplicate texts (case/space-insensitive) dropped."""
    seen: set[str] = set()
    out: list[Example] = []
    for path in sorted(data_dir.glob("*.jsonl")):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row["label"] not in LABELS:
                raise ValueError(f"{path.name}:{lineno}: unknown label {row['label']!r}")
            key = _key(row["text"])
            if key in seen:
                continue
            seen.add(key)
            out.append(Example(row["text"], row["label"], row.get("tag", "")))
    return out


def load_held_out(held_out_dir: Path = HELD_OUT_DIR) -> list[Example]:
    """The held-out hard cases (same format; never part of any split)."""
    return load_examples(held_out_dir)


def load_train_only(data_dir: Path = DATA_DIR) -> list[Example]:
    """`train_only/`'s messages, less any whose text a split or the held-out set also has."""
    elsewhere = {_key(e.text) for e in load_examples(data_dir) + load_held_out(data_dir / HELD_OUT_DIR.name)}
    return [e for e in load_examples(data_dir / TRAIN_ONLY_DIR.name) if _key(e.text) not in elsewhere]


def training_splits(
    data_dir: Path = DATA_DIR, validation: float = 0.15, test: float = 0.15, seed: int = 0, train_only: bool = True
) -> Splits:
    """The stratified split of the top-level files, with `train_only/` added to train alone when asked."""
    splits = stratified_split(load_examples(data_dir), validation, test, seed)
    extra = load_train_only(data_dir) if train_only else []
    if not extra:
        return splits
    train = splits.train + extra
    random.Random(seed).shuffle(train)
    return Splits(train, splits.validation, splits.test)


def stratified_split(examples: list[Example], validation: float = 0.15, test: float = 0.15, seed: int = 0) -> Splits:
    """Split per (label, tag) stratum so hard cases appear in every split, not just in train."""
    rng = random.Random(seed)
    strata: dict[tuple[str, str], list[Example]] = {}
    for ex in examples:
        strata.setdefault((ex.label, ex.tag), []).append(ex)
    train, val, tst = [], [], []
    for key in sorted(strata):
        items = strata[key][:]
        rng.shuffle(items)
        n_test = round(len(items) * test)
        n_val = round(len(items) * validation)
        tst += items[:n_test]
        val += items[n_test : n_test + n_val]
        train += items[n_test + n_val :]
    for part in (train, val, tst):
        rng.shuffle(part)
    return Splits(train, val, tst)


def dataset_sha256(data_dir: Path = DATA_DIR) -> str:
    h = hashlib.sha256()
    # Held-out files count too: the metrics report them, so changing them means re-evaluating.
    for path in sorted(data_dir.rglob("*.jsonl")):
        h.update(str(path.relative_to(data_dir)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()
