"""The write-ahead journal of a publish in progress: what a crash must undo.

Triton reads versions from the live repository, so a new version has to be there before it can
load. What makes that crash-safe is this journal, one file per model being published
(`<repo>/<model>/.fluxserve_publish.json`): it is written before anything of the model changes
and holds the model's config.pbtxt and version list as they were, and every version number this
publish creates (recorded before the version's folder appears). A publish commits by deleting the journals,
only after Triton loaded the new versions. So at any moment:

* no journal: the model's folder is exactly the last committed set;
* a journal: a publish is running (it holds the publish lock) or its publisher died. Rolling
  back removes only the versions listed and restores the config; `recover_repository` does it
  for every model, and runs when Triton starts (runtime.launcher) and before each publish, so
  Triton never serves a version whose job was reported failed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from publish.publish_lock import PublishLockTimeout, repository_lock

log = logging.getLogger(__name__)

JOURNAL = ".fluxserve_publish.json"
CONFIG = "config.pbtxt"


def _path(repo: Path, name: str) -> Path:
    return repo / name / JOURNAL


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)  # atomic: a reader sees the old journal or the new one, never half


def uncommitted(repo: Path, name: str) -> bool:
    """A publish of `name` began and has neither committed nor been rolled back: the model's
    folder may hold versions that must not be served (runtime.repository_sync waits)."""
    return _path(repo, name).exists()


def read(repo: Path, name: str) -> dict | None:
    path = _path(repo, name)
    return json.loads(path.read_text()) if path.exists() else None


def begin(repo: Path, names: Iterable[str]) -> None:
    """Start journaling `names` (call under the publish lock, before anything is written)."""
    for name in names:
        config = repo / name / CONFIG
        (repo / name).mkdir(parents=True, exist_ok=True)
        _write(
            _path(repo, name),
            {
                "config_before": config.read_text() if config.exists() else None,
                "versions_before": _versions(repo / name),
                "versions": [],
            },
        )


def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def note_version(repo: Path, name: str, version: int) -> None:
    """Record a version this publish is about to create (before its folder appears). A no-op
    outside a journaled publish (the offline `fluxserve-export` CLI: nothing serves, nothing to undo)."""
    journal = read(repo, name)
    if journal is not None:
        journal["versions"] = sorted({*journal["versions"], version})
        _write(_path(repo, name), journal)


def created(repo: Path, name: str) -> list[int]:
    journal = read(repo, name)
    return list(journal["versions"]) if journal else []


def commit(repo: Path, names: Iterable[str]) -> None:
    for name in names:
        _path(repo, name).unlink(missing_ok=True)


def roll_back(repo: Path, names: Iterable[str] | None = None) -> list[str]:
    """Undo the journaled publish of `names` (default: every model with a journal); returns the
    models rolled back. Call under the publish lock."""
    if names is None:
        names = sorted(p.parent.name for p in repo.glob(f"*/{JOURNAL}"))
    rolled = []
    for name in names:
        model_dir = repo / name
        for staging in model_dir.glob(".staging-*"):  # a version still being assembled
            shutil.rmtree(staging, ignore_errors=True)
        journal = read(repo, name)
        if journal is None:
            continue
        # Recorded versions, and any other that appeared since the publish began (the publisher
        # held the lock, so it made them, whether or not it went through publish.repository).
        created = set(journal["versions"]) | (set(_versions(model_dir)) - set(journal.get("versions_before", [])))
        for version in sorted(created):
            log.warning("rolling back %s version %d (its publish did not commit)", name, version)
            shutil.rmtree(model_dir / str(version), ignore_errors=True)
        config = model_dir / CONFIG
        if journal["config_before"] is None:
            config.unlink(missing_ok=True)
        elif not config.exists() or config.read_text() != journal["config_before"]:
            log.warning("restoring %s/%s", name, CONFIG)
            tmp = config.with_name(CONFIG + ".tmp")
            tmp.write_text(journal["config_before"])
            tmp.replace(config)  # a new inode: hard-linked copies of the repository stay untouched
        _path(repo, name).unlink()
        rolled.append(name)
    return rolled


def recover_repository(repo: Path, lock_timeout_s: float = 0.0) -> list[str]:
    """Start-up cleanup: roll back whatever a dead publisher left. Skipped (with a warning) when
    a live publisher holds the lock: it will roll back or commit its own work."""
    if not repo.is_dir():
        return []
    try:
        with repository_lock(repo, lock_timeout_s):
            rolled = roll_back(repo)
    except PublishLockTimeout:
        log.warning("a publish is in progress in %s; leaving its files to it", repo)
        return []
    if rolled:
        log.warning("removed the uncommitted versions of an interrupted publish: %s", ", ".join(rolled))
    return rolled
