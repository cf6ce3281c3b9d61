"""Deleting ONNX exports no served version uses any more.

FLUX exports live in `<build>/flux/export/<component>/<fingerprint>/` and a published version
hard-links their files into the model repository (publish.repository._place). Once every version
built from an export has been pruned, its files have no other link: such an export, untouched for
longer than the retention, is deleted (tens of GB per LoRA with FLUX.1-dev). Where the repository
is on another filesystem (copies, not links) every old export counts as unused: deleting it only
costs a re-export should the same inputs be published again.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from export.flux.settings import EXPORT_MARKER

log = logging.getLogger(__name__)


def prune_unused_exports(export_root: Path, older_than_s: float, now: float | None = None) -> list[Path]:
    now = time.time() if now is None else now
    removed = []
    for marker in sorted(export_root.glob(f"*/*/{EXPORT_MARKER}")):
        folder = marker.parent
        if now - marker.stat().st_mtime < older_than_s:
            continue
        files = [p for p in folder.rglob("*") if p.is_file() and p.name != EXPORT_MARKER]
        if any(p.stat().st_nlink > 1 for p in files):
            continue  # a repository version still links it
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info("deleted %d unused ONNX export(s) under %s", len(removed), export_root)
    return removed
