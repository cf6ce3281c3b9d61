"""Old ONNX exports are deleted only when no repository version links their files."""

from __future__ import annotations

import os
import time
from pathlib import Path

from export.flux.settings import EXPORT_MARKER as MARKER
from publish.retention import prune_unused_exports


def _export(root: Path, component: str, fp: str) -> Path:
    folder = root / component / fp
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / MARKER).write_text("{}")
    return folder


def test_only_old_unlinked_exports_go(tmp_path: Path) -> None:
    root = tmp_path / "export"
    served = _export(root, "flux_transformer", "aaa")
    unused = _export(root, "flux_transformer", "bbb")
    fresh = _export(root, "flux_vae_decoder", "ccc")
    version = tmp_path / "repo" / "flux_transformer" / "3"
    version.mkdir(parents=True)
    os.link(served / "model.onnx", version / "model.onnx")  # what publishing does

    assert prune_unused_exports(root, older_than_s=3600) == []  # all are recent
    later = time.time() + 7200
    os.utime(fresh / MARKER, (later, later))  # touched just now, at "later"
    assert prune_unused_exports(root, older_than_s=3600, now=later) == [unused]
    assert served.exists() and fresh.exists() and not unused.exists()
    (version / "model.onnx").unlink()  # the version was pruned
    assert prune_unused_exports(root, older_than_s=3600, now=later) == [served]
