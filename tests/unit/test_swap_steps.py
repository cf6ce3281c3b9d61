"""What a LoRA publish writes, reads and reloads: unchanged configs stay untouched, hard-linked
files are not hashed again, and generate / generate_stream load as one concurrent step after
the components they pin."""

from __future__ import annotations

import os
from pathlib import Path

from contract.specs import FLUX_PREPARE, FLUX_TRANSFORMER, GENERATE, GENERATE_STREAM
from export.deployments import flux_deployments
from publish.hot_swap import _steps
from publish.repository import write_config


def test_unchanged_config_is_not_rewritten(tmp_path: Path) -> None:
    dep = flux_deployments()[FLUX_TRANSFORMER]
    path = write_config(tmp_path, dep, "cpu")
    os.utime(path, ns=(1, 1))
    write_config(tmp_path, dep, "cpu")
    assert path.stat().st_mtime_ns == 1, "an identical config was rewritten"
    path.write_text(path.read_text() + "\n# stale\n")
    write_config(tmp_path, dep, "cpu")
    assert "stale" not in path.read_text() and path.stat().st_mtime_ns != 1


def test_pipelines_load_together_after_their_components() -> None:
    together = frozenset({GENERATE.name, GENERATE_STREAM.name})
    changed = [FLUX_TRANSFORMER, GENERATE.name, GENERATE_STREAM.name]
    assert _steps(changed, together) == [FLUX_TRANSFORMER, (GENERATE.name, GENERATE_STREAM.name)]
    assert _steps([FLUX_PREPARE.name, GENERATE.name], together) == [FLUX_PREPARE.name, (GENERATE.name,)]
    assert _steps([FLUX_TRANSFORMER], together) == [FLUX_TRANSFORMER]


def test_publish_reads_only_files_it_did_not_link(tmp_path: Path) -> None:
    """A LoRA publish hard-links the unchanged tensors: their hashes come from the previous
    manifest (the files are never modified in place), only the new tensor is read."""
    import hashlib
    import json

    from export.fingerprints import sha256_file
    from publish.repository import MANIFEST, publish

    src = tmp_path / "export"
    src.mkdir()
    (src / "shared.bin").write_bytes(b"unchanged tensor")
    (src / "lora.bin").write_bytes(b"first delta")
    dep = flux_deployments()[FLUX_TRANSFORMER]
    repo = tmp_path / "repo"
    first = publish(
        repo, dep, "cpu", {"weights/shared.bin": src / "shared.bin", "weights/lora.bin": src / "lora.bin"}, {"v": 1}
    )
    # Same inode, other bytes: only a hash taken from the manifest (not from the file) survives this.
    with (src / "shared.bin").open("r+b") as fh:
        fh.write(b"UNCHANGED")
    (src / "lora2.bin").write_bytes(b"second delta")
    second = publish(
        repo, dep, "cpu", {"weights/shared.bin": src / "shared.bin", "weights/lora.bin": src / "lora2.bin"}, {"v": 2}
    )
    files = json.loads((second.path / MANIFEST).read_text())["files"]
    first_files = json.loads((first.path / MANIFEST).read_text())["files"]
    assert (
        files["weights/shared.bin"]
        == first_files["weights/shared.bin"]
        == hashlib.sha256(b"unchanged tensor").hexdigest()
    )
    assert files["weights/lora.bin"] == sha256_file(src / "lora2.bin") != first_files["weights/lora.bin"]
