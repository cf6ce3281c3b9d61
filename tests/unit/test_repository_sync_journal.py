"""The repository-sync sidecar loads only committed versions: a model whose publish journal says a
publish is under way (publish.publish_journal) is not loaded until it commits or rolls back, and a
model that changed while Triton loaded it is loaded again. Triton's load is recorded here (what
the real Triton does with a load: tests/integration/test_repository_sync.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.specs import GENERATE
from publish import publish_journal
from runtime import repository_sync
from runtime.repository_sync import SyncSettings, snapshot, sync_once


def model(repo: Path, name: str, *versions: int) -> None:
    (repo / name).mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\n')
    for v in versions:
        add_version(repo, name, v)


def add_version(repo: Path, name: str, version: int) -> None:
    """As publish/repository.py does: a staging folder renamed into place."""
    staging = repo / name / f".staging-{version}"
    staging.mkdir()
    (staging / "model.py").write_text(f"# {name} v{version}\n")
    staging.rename(repo / name / str(version))


def begin_publish(repo: Path, name: str, version: int) -> None:
    """A publisher between its journal and its commit: the new version is on disk, uncommitted."""
    publish_journal.begin(repo, [name])
    publish_journal.note_version(repo, name, version)
    add_version(repo, name, version)


class Triton:
    """Records loads: the model and the versions on disk when Triton would read them."""

    def __init__(self, repo: Path) -> None:
        self.repo, self.loads = repo, []
        self.during_load = None

    def load_models(self, url: str, steps: list, timeout_s: float = 0.0) -> None:
        (name,) = steps
        if self.during_load is not None:
            self.during_load(name)
        self.loads.append((name, sorted(int(p.name) for p in (self.repo / name).iterdir() if p.name.isdigit())))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    model(tmp_path, "component", 1)
    model(tmp_path, GENERATE.name, 1)
    return tmp_path


@pytest.fixture
def triton(repo: Path, monkeypatch: pytest.MonkeyPatch) -> Triton:
    fake = Triton(repo)
    monkeypatch.setattr(repository_sync, "load_models", fake.load_models)
    return fake


def test_an_uncommitted_version_is_loaded_only_once_committed(repo: Path, triton: Triton) -> None:
    settings = SyncSettings(model_repository=repo)
    state = snapshot(repo)
    begin_publish(repo, "component", 2)
    for _ in range(2):  # polls during the publish load nothing
        state = sync_once(settings, state)
    assert triton.loads == []
    publish_journal.commit(repo, ["component"])
    state = sync_once(settings, state)
    assert triton.loads == [("component", [1, 2])]
    assert sync_once(settings, state) == state and len(triton.loads) == 1


def test_a_rolled_back_publish_leaves_the_committed_versions_loaded(repo: Path, triton: Triton) -> None:
    """Even when this Triton loaded the new version before the sidecar started (Triton's own start
    during a live publish), the rollback is followed by a load of the committed set."""
    settings = SyncSettings(model_repository=repo)
    begin_publish(repo, "component", 2)
    begin_publish(repo, GENERATE.name, 2)
    state = snapshot(repo)  # the sidecar starts now: both models are in doubt
    assert set(state) == set()
    state = sync_once(settings, state)
    assert triton.loads == []
    publish_journal.roll_back(repo)
    state = sync_once(settings, state)
    assert triton.loads == [("component", [1]), (GENERATE.name, [1])]  # components first
    assert state == snapshot(repo)


def test_a_publish_that_begins_during_a_load_makes_the_model_load_again(repo: Path, triton: Triton) -> None:
    settings = SyncSettings(model_repository=repo)
    state = snapshot(repo)
    add_version(repo, "component", 2)  # committed (no journal)
    add_version(repo, GENERATE.name, 2)

    def publish_begins(name: str) -> None:  # the race: journal and version 3 appear mid-load
        if name == "component" and not publish_journal.uncommitted(repo, name):
            begin_publish(repo, name, 3)

    triton.during_load = publish_begins
    state = sync_once(settings, state)
    assert triton.loads == [("component", [1, 2, 3])]  # Triton may have read the uncommitted version 3
    assert "component" not in state  # so it is in doubt, and the pipeline waits
    triton.during_load = None
    state = sync_once(settings, state)  # still journaled: nothing
    assert len(triton.loads) == 1
    publish_journal.roll_back(repo)  # the publisher failed: version 3 goes
    state = sync_once(settings, state)
    assert triton.loads[1:] == [("component", [1, 2]), (GENERATE.name, [1, 2])]
    assert state == snapshot(repo)


def test_a_model_changed_and_restored_during_a_load_is_loaded_again(repo: Path, triton: Triton) -> None:
    """A whole publish that came and went while Triton loaded: the version list is the same
    before and after, but the folder's time is not, so the load is not trusted."""
    settings = SyncSettings(model_repository=repo)
    state = snapshot(repo)
    add_version(repo, GENERATE.name, 2)

    def publish_comes_and_goes(name: str) -> None:
        begin_publish(repo, name, 3)
        publish_journal.roll_back(repo, [name])

    triton.during_load = publish_comes_and_goes
    state = sync_once(settings, state)
    assert GENERATE.name not in state
    triton.during_load = None
    state = sync_once(settings, state)
    assert [load[0] for load in triton.loads] == [GENERATE.name, GENERATE.name]
    assert state == snapshot(repo)
