"""Content identity of build inputs and outputs: what decides whether an export is reused and
whether a published version is up to date (the publisher records the same hashes in manifests)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

FileId = tuple[int, int]
"""(st_dev, st_ino): one file, however many hard links name it."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_hashes(root: Path, known: Mapping[FileId, str] | None = None, exclude: Collection[str] = ()) -> dict[str, str]:
    """sha256 of every file below root, keyed by its relative path (files named in `exclude`
    left out). A file that is a hard link of one in `known` takes its recorded hash instead of
    being read again."""
    known = known or {}
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in exclude:
            st = p.stat()
            out[str(p.relative_to(root))] = known.get((st.st_dev, st.st_ino)) or sha256_file(p)
    return out


def fingerprint(provenance: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(provenance, sort_keys=True, default=str).encode()).hexdigest()[:16]
