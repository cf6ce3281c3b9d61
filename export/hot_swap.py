"""Publish new model versions and load them into a running Triton, or leave the old ones serving.

Triton (explicit model control) loads a new version beside the serving one and switches only
when it is ready, so a successful swap has no downtime. When publishing or loading fails, the
version folders this call created are removed and the models are reloaded, so Triton goes on
serving exactly the set it served before.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from export.repository import prune, versions
from export.model_control import load_models

log = logging.getLogger(__name__)

T = TypeVar("T")


class SwapError(RuntimeError):
    """Publishing or loading the new versions failed; the previous versions keep serving."""


def rollback(repo: Path, before: dict[str, list[int]], triton_http_url: str) -> None:
    for name, old in before.items():
        for v in sorted(set(versions(repo, name)) - set(old)):
            log.warning("rolling back %s version %d", name, v)
            shutil.rmtree(repo / name / str(v), ignore_errors=True)
    try:
        load_models(triton_http_url, list(before))
    except Exception:  # Triton may be the thing that failed; the folders are already clean
        log.exception("reloading the previous versions after a failed swap also failed")


def publish_and_load(
    repo: Path,
    triton_http_url: str,
    models: Sequence[str],
    publish_fn: Callable[[], T],
    keep_versions: int = 2,
) -> T:
    """Run `publish_fn` (writes new versions of `models` into `repo`), then load `models` in order.

    Order matters: callers list the models a pipeline calls before the pipeline model itself, so
    the pipeline's new version only starts once everything it pins is ready.
    """
    before = {name: versions(repo, name) for name in models}
    try:
        result = publish_fn()
        # Only models with a new version: reloading an unchanged one restarts nothing useful but
        # costs a second or two of Triton's time each (its stubs re-initialise).
        changed = [name for name in models if versions(repo, name) != before[name]]
        load_models(triton_http_url, changed)
    except Exception as e:
        rollback(repo, before, triton_http_url)
        raise SwapError(f"{type(e).__name__}: {e}") from e
    for name in models:
        prune(repo, name, keep=keep_versions)
    return result
