"""What a publisher that died mid-publish leaves is undone at the next start, and only that."""

from __future__ import annotations

from pathlib import Path

from publish import publish_journal
from publish.publish_lock import PublishLockTimeout, repository_lock
from publish.repository import versions


def _model(repo: Path, name: str, vs: list[int], config: str) -> None:
    for v in vs:
        (repo / name / str(v)).mkdir(parents=True)
        (repo / name / str(v) / "weights").write_text(f"{name} v{v}")
    (repo / name / "config.pbtxt").write_text(config)


def _crashed_publish(repo: Path) -> None:
    """Journal both models, write a version of each and a new config, then "die"."""
    publish_journal.begin(repo, ["a", "b"])
    publish_journal.note_version(repo, "a", 3)
    (repo / "a" / "config.pbtxt").write_text("new config")
    (repo / "a" / "3").mkdir()
    (repo / "b" / "2").mkdir()  # written without publish.repository: found by the version list
    (repo / "b" / ".staging-3-123").mkdir()


def test_recovery_removes_uncommitted_versions_and_restores_configs(tmp_path: Path) -> None:
    _model(tmp_path, "a", [1, 2], "old config")
    _model(tmp_path, "b", [1], "b config")
    _model(tmp_path, "untouched", [7], "c")
    _crashed_publish(tmp_path)

    assert publish_journal.recover_repository(tmp_path) == ["a", "b"]
    assert (
        versions(tmp_path, "a") == [1, 2] and versions(tmp_path, "b") == [1] and versions(tmp_path, "untouched") == [7]
    )
    assert (tmp_path / "a" / "config.pbtxt").read_text() == "old config"
    assert (tmp_path / "a" / "2" / "weights").read_text() == "a v2"
    assert not list(tmp_path.glob("*/.fluxserve_publish.json")) and not list(tmp_path.glob("*/.staging-*"))
    assert publish_journal.recover_repository(tmp_path) == []  # nothing left to do


def test_a_committed_publish_is_kept(tmp_path: Path) -> None:
    _model(tmp_path, "a", [1], "old")
    publish_journal.begin(tmp_path, ["a"])
    publish_journal.note_version(tmp_path, "a", 2)
    (tmp_path / "a" / "2").mkdir()
    publish_journal.commit(tmp_path, ["a"])
    assert publish_journal.recover_repository(tmp_path) == []
    assert versions(tmp_path, "a") == [1, 2]


def test_recovery_leaves_a_live_publish_alone(tmp_path: Path) -> None:
    _model(tmp_path, "a", [1, 2], "old config")
    _model(tmp_path, "b", [1], "b config")
    _crashed_publish(tmp_path)
    with repository_lock(tmp_path):  # a publisher that is alive holds the lock
        assert publish_journal.recover_repository(tmp_path) == []
        assert versions(tmp_path, "a") == [1, 2, 3]
        try:
            with repository_lock(tmp_path, timeout_s=0.3):
                raise AssertionError("the lock was taken twice")
        except PublishLockTimeout:
            pass
