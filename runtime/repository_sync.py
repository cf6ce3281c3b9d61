"""Keep one Triton in step with a shared model repository: `python -m runtime.repository_sync`.

With several Triton replicas on one shared repository (Kubernetes: a ReadWriteMany volume), the
worker that publishes a LoRA loads the new versions into the one replica its Service call reaches.
This loop runs beside every replica (a sidecar in the Triton pod, talking to 127.0.0.1) and loads
whatever changed in the repository into its own Triton through the model-control API, so every
replica serves a published version within one poll interval.

Why a sidecar and not Triton's own `--model-control-mode=poll`: poll mode forbids the model-control
API, which the worker's publish (load, and roll back on failure) and `fluxserve-export --triton-url`
need; and it loads changed models in no particular order, while a pipeline must load after the
component versions it pins. Here the component models load first and the pipelines last.
Versions appear atomically (staging folder, then rename), so a poll never sees a half-written one.

Only committed versions are loaded. A publish journals a model (publish.publish_journal) before it
writes anything and drops the journal when it commits; a rollback removes its versions. So a model
with a journal is left alone until the journal is gone; and a model whose folder changed while
Triton was loading it (a publish began, or came and went, during the load) is loaded again at the
next poll, so a replica never keeps a version whose publish was rolled back.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.specs import CLASSIFY, ENDPOINTS, GENERATE
from publish import publish_journal
from publish.model_control import load_models
from publish.repository import SOURCE_REPOSITORY, versions

log = logging.getLogger("fluxserve.repository_sync")

# Models that call other models (BLS): loaded after everything else that changed in the same poll.
PIPELINES: tuple[str, ...] = (CLASSIFY.name, GENERATE.name)

Fingerprint = tuple[tuple[int, ...], int, int]
"""A model's version folders, its config.pbtxt modification time and its folder's (ns): adding or
removing a version, a staging folder or a publish journal changes the folder's."""


class SyncSettings(BaseSettings):
    """Environment prefix: FLUXSERVE_SYNC_."""

    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_SYNC_")

    model_repository: Path = SOURCE_REPOSITORY
    triton_http_url: str = f"{ENDPOINTS.host}:{ENDPOINTS.triton_http_port}"
    interval_s: float = 10.0
    load_timeout_s: float = 900.0


def fingerprint(repo: Path, name: str) -> Fingerprint | None:
    """The model's fingerprint, None while a publish of it is uncommitted (or it has no config)."""
    model_dir = repo / name
    try:
        # The journal is looked for last: a publish that begins after it was looked for changes
        # the folder's time, which the check after the load sees.
        found = (
            tuple(versions(repo, name)),
            (model_dir / "config.pbtxt").stat().st_mtime_ns,
            model_dir.stat().st_mtime_ns,
        )
    except FileNotFoundError:
        return None
    return None if publish_journal.uncommitted(repo, name) else found


def snapshot(repo: Path) -> dict[str, Fingerprint]:
    """Fingerprints of the exported models (those with a config.pbtxt) in `repo` whose last
    publish committed; models with a publish in progress (or abandoned) are left out."""
    out: dict[str, Fingerprint] = {}
    for config in sorted(repo.glob("*/config.pbtxt")):
        name = config.parent.name
        found = fingerprint(repo, name)
        if found is not None:
            out[name] = found
    return out


def changed_models(before: Mapping[str, Fingerprint], now: Mapping[str, Fingerprint]) -> list[str]:
    """Models new or changed since `before`, components first and pipelines last."""
    changed = [name for name, fp in now.items() if before.get(name) != fp]
    return sorted(changed, key=lambda n: (n in PIPELINES, PIPELINES.index(n) if n in PIPELINES else 0, n))


def sync_once(settings: SyncSettings, before: Mapping[str, Fingerprint]) -> dict[str, Fingerprint]:
    """Load what changed since `before`; returns the state now in sync. When a load fails, the
    returned state keeps the old fingerprint of that model, so the next poll tries again; when
    the model changed during its load, what Triton read is unknown: it is dropped from the
    state, so it is loaded again once its publish has committed or been rolled back."""
    repo = settings.model_repository
    now = snapshot(repo)
    done = dict(before)
    waiting = sorted(p.parent.name for p in repo.glob(f"*/{publish_journal.JOURNAL}"))
    if waiting:
        log.info("not loading %s: a publish of them has not committed", ", ".join(waiting))
    for name in changed_models(before, now):
        if name in PIPELINES and set(waiting) - set(PIPELINES):
            break  # a pipeline loads after its components, and those are not all committed yet
        try:
            load_models(settings.triton_http_url, [name], timeout_s=settings.load_timeout_s)
        except Exception as e:  # Triton restarting, or a version it refuses: retried next poll
            log.warning("loading %s into %s failed (retrying next poll): %s", name, settings.triton_http_url, e)
            break  # a pipeline must not load before a component that failed
        if fingerprint(repo, name) != now[name]:
            log.warning("%s changed while it loaded (a publish began or ended); loading it again later", name)
            done.pop(name, None)
            break  # nor before a component whose loaded versions are in doubt
        log.info("loaded %s versions %s", name, list(now[name][0]))
        done[name] = now[name]
    return done


def run(settings: SyncSettings, stop: threading.Event) -> None:
    """Poll until `stop` is set. The starting state is the repository as it is now: Triton loaded
    all of it at start-up (the launcher's --load-model), so only later changes need a load."""
    state = snapshot(settings.model_repository)
    log.info(
        "watching %s for %s every %.0f s", settings.model_repository, settings.triton_http_url, settings.interval_s
    )
    while not stop.wait(settings.interval_s):
        state = sync_once(settings, state)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval-s", type=float)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = SyncSettings(**({"interval_s": args.interval_s} if args.interval_s else {}))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run(settings, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
