"""Write versioned models into a Triton model repository, with provenance manifests.

Layout of one model:

    <repo>/<name>/config.pbtxt            generated from its Deployment (export/triton_config.py)
    <repo>/<name>/model.py                committed source of a python model (ignored by Triton)
    <repo>/<name>/<version>/model.py      copied from the source above
    <repo>/<name>/<version>/...           artifacts (model.onnx, tokenizer/, ...)
    <repo>/<name>/<version>/fluxserve_manifest.json

A version is assembled in a hidden staging folder and renamed into place, so Triton never sees a
half-written version; within a hot swap (publish.hot_swap) the version is first recorded in the
publish journal (publish.publish_journal), so a crash before the swap commits is undone at the
next start. Version numbers are chosen under the publish lock (publish.publish_lock). Publishing
is idempotent: when the newest version already has the same fingerprint (same inputs and
settings, export.fingerprints), nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.paths import MODEL_REPOSITORY
from export.fingerprints import FileId, fingerprint, tree_hashes
from export.triton_config import Deployment, Target, config_text
from publish.publish_journal import note_version

log = logging.getLogger(__name__)

SOURCE_REPOSITORY = MODEL_REPOSITORY
MANIFEST = "fluxserve_manifest.json"


@dataclass(frozen=True)
class Published:
    name: str
    version: int
    path: Path
    created: bool


def versions(repo: Path, name: str) -> list[int]:
    model_dir = repo / name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_manifest(repo: Path, name: str) -> dict[str, Any] | None:
    vs = versions(repo, name)
    if not vs:
        return None
    path = repo / name / str(vs[-1]) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def known_hashes(repo: Path, name: str, manifest: Mapping[str, Any] | None) -> dict[FileId, str]:
    """The hashes the newest version's manifest recorded, by the file they belong to. Version
    files are never modified in place (a patched tensor is a new file), so a hard link of one
    has that hash: a LoRA publish then reads only the tensors it wrote, not the shared ones
    (24 GB per publish on FLUX.1-dev otherwise)."""
    if not manifest or "version" not in manifest:
        return {}
    folder = repo / name / str(manifest["version"])
    out: dict[FileId, str] = {}
    for rel, digest in (manifest.get("files") or {}).items():
        try:
            st = (folder / rel).stat()
        except OSError:
            continue
        out[(st.st_dev, st.st_ino)] = digest
    return out


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)  # ONNX files can be GBs: share the inode when on one filesystem
    except OSError:
        shutil.copy2(src, dst)


def write_config(repo: Path, dep: Deployment, target: Target) -> Path:
    path = repo / dep.spec.name / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = config_text(dep, target)
    if path.exists() and path.read_text() == text:
        # Untouched: its modification time is part of what runtime.repository_sync watches, so
        # rewriting identical text would make an unchanged model look changed.
        return path
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def needs_model_py(dep: Deployment, target: Target) -> bool:
    return dep.kind == "python" or target == "cpu"


def publish(
    repo: Path,
    dep: Deployment,
    target: Target,
    files: Mapping[str, Path],
    provenance: Mapping[str, Any],
    force: bool = False,
    report: Mapping[str, Any] | None = None,
    min_version: int = 1,
) -> Published:
    """Write `files` (relative name -> source path) as a new version of `dep`'s model.

    `provenance` describes what the version was built from (checkpoint, LoRA, scale, settings);
    its fingerprint decides idempotency, and it is stored in the manifest with file hashes.
    `report` holds measured facts (parity errors, timings) stored in the manifest but not
    fingerprinted, so re-running an export does not create a new version. A new version is
    numbered at least `min_version` (keeps a sibling model's numbers aligned with another's).
    """
    name = dep.spec.name
    fp = fingerprint({**provenance, "target": target, "config": config_text(dep, target)})
    current = latest_manifest(repo, name)
    write_config(repo, dep, target)
    if current is not None and current.get("fingerprint") == fp and not force:
        version = versions(repo, name)[-1]
        log.info("%s: version %d is up to date (fingerprint %s)", name, version, fp)
        return Published(name, version, repo / name / str(version), created=False)

    version = max((versions(repo, name) or [0])[-1] + 1, min_version)
    staging = repo / name / f".staging-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if needs_model_py(dep, target):
            source = SOURCE_REPOSITORY / name / "model.py"
            shutil.copy2(source, staging / "model.py")
        for rel, src in files.items():
            _place(Path(src), staging / rel)
        manifest = {
            "model": name,
            "version": version,
            "fingerprint": fp,
            "target": target,
            "created_unix": time.time(),
            "provenance": dict(provenance),
            "report": dict(report or {}),
            "files": tree_hashes(staging, known_hashes(repo, name, current), exclude={MANIFEST}),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        final = repo / name / str(version)
        note_version(repo, name, version)  # before it appears: a crash from here on is undone
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("%s: wrote version %d (%s)", name, version, final)
    return Published(name, version, final, created=True)


def prune(repo: Path, name: str, keep: int = 2) -> list[int]:
    """Delete all but the newest `keep` versions (call after Triton has loaded the newest)."""
    removed = []
    for v in versions(repo, name)[:-keep] if keep > 0 else []:
        shutil.rmtree(repo / name / str(v), ignore_errors=True)
        removed.append(v)
    return removed
