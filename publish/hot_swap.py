"""Publish new model versions and load them into a running Triton, or leave the old ones serving.

Triton (explicit model control) loads a new version beside the serving one and switches only
when it is ready, so a successful swap has no downtime. A publish:

1. takes the publish lock (publish.publish_lock; plus the caller's cross-machine lock, if any),
   so version numbers are chosen and written by one publisher at a time;
2. rolls back what a publisher that died mid-publish left (publish.publish_journal);
3. journals the models, writes the new versions, loads them;
4. commits (drops the journals) only after every load succeeded, then prunes old versions.

When publishing or loading fails, the versions this call created are removed, the configs it
changed are restored and the models are reloaded, so Triton goes on serving exactly the set it
served before. A crash anywhere before the commit is undone the same way at Triton's next start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import TypeVar

from publish import publish_journal
from publish.model_control import load_models
from publish.publish_lock import repository_lock
from publish.repository import prune, versions

log = logging.getLogger(__name__)

T = TypeVar("T")


class SwapError(RuntimeError):
    """Publishing or loading the new versions failed; the previous versions keep serving."""


def rollback(repo: Path, models: Sequence[str], triton_http_url: str) -> None:
    """Undo this publish (call under the publish lock): only the versions it created go."""
    publish_journal.roll_back(repo, models)
    try:
        load_models(triton_http_url, list(models))
    except Exception:  # Triton may be the thing that failed; the folders are already clean
        log.exception("reloading the previous versions after a failed swap also failed")


def recover_and_reload(repo: Path, triton_http_url: str) -> list[str]:
    """After a publisher died mid-publish (its job was reaped while publishing): roll its
    uncommitted versions back and reload those models, so the running Triton drops a version it
    may already have loaded. Skipped when another publish holds the lock (it recovers first)."""
    rolled = publish_journal.recover_repository(repo)
    if rolled:
        try:
            load_models(triton_http_url, rolled)
        except Exception:  # Triton down: it serves the committed set when it comes back
            log.exception("reloading %s after recovering an interrupted publish failed", rolled)
    return rolled


def _steps(changed: list[str], together: frozenset[str]) -> list[str | tuple[str, ...]]:
    group = tuple(n for n in changed if n in together)
    steps: list[str | tuple[str, ...]] = []
    for name in changed:
        if name not in together:
            steps.append(name)
        elif name == group[0]:
            steps.append(group)
    return steps


def publish_and_load(
    repo: Path,
    triton_http_url: str,
    models: Sequence[str],
    publish_fn: Callable[[], T],
    keep_versions: int = 2,
    lock: AbstractContextManager[object] | None = None,
    lock_timeout_s: float = 3600.0,
    together: frozenset[str] = frozenset(),
) -> T:
    """Run `publish_fn` (writes new versions of `models` into `repo`), then load `models` in order.

    Order matters: callers list the models a pipeline calls before the pipeline model itself, so
    the pipeline's new version only starts once everything it pins is ready. Changed models in
    `together` (pipelines that do not call each other) load at the same time, in the place of
    the first of them. `lock` (e.g. a Redis lock) is held around the repository's own file lock.
    """
    with ExitStack() as held:
        if lock is not None:
            held.enter_context(lock)
        held.enter_context(repository_lock(repo, lock_timeout_s))
        recovered = publish_journal.roll_back(repo)
        if recovered:  # Triton may have loaded a version whose publish never committed
            log.warning("rolled back an interrupted publish of %s", recovered)
            load_models(triton_http_url, [m for m in recovered if m not in models])
        before = {name: versions(repo, name) for name in models}
        publish_journal.begin(repo, models)
        try:
            result = publish_fn()
            # Only models with a new version: reloading an unchanged one restarts nothing useful
            # but costs a second or two of Triton's time each (its stubs re-initialise).
            changed = [name for name in models if versions(repo, name) != before[name] or name in recovered]
            load_models(triton_http_url, _steps(changed, together))
        except BaseException as e:
            rollback(repo, models, triton_http_url)
            if not isinstance(e, Exception):
                raise
            raise SwapError(f"{type(e).__name__}: {e}") from e
        publish_journal.commit(repo, models)
        for name in models:
            prune(repo, name, keep=keep_versions)
    return result
