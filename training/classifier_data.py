"""The labeled chat-message dataset: loading, de-duplication and a stratified split."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from client.contract import LABELS

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "classifier"
HELD_OUT_DIR = DATA_DIR / "held_out"
"""Hand-written hard cases kept out of training, validation and test alike: `load_examples` reads
only the top-level files, so these judge the finished model on messages no split has seen."""


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
            key = " ".join(row["text"].lower().split())
            if key in seen:
                continue
            seen.add(key)
            out.append(Example(row["text"], row["label"], row.get("tag", "")))
    return out


def load_held_out(held_out_dir: Path = HELD_OUT_DIR) -> list[Example]:
    """The held-out hard cases (same format; never part of any split)."""
    return load_examples(held_out_dir)


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
