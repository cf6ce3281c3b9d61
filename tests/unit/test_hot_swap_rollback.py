"""A publish whose load fails leaves the repository as it was: the versions it wrote are removed,
the ones that were there stay. No Triton answers here, so every load fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from publish.hot_swap import SwapError, publish_and_load
from publish.repository import versions
from runtime.processes import free_port


def _version(repo: Path, model: str, v: int) -> None:
    (repo / model / str(v)).mkdir(parents=True)
    (repo / model / str(v) / "weights").write_text(f"{model} v{v}")


def test_a_failed_load_removes_only_the_new_versions(tmp_path: Path) -> None:
    _version(tmp_path, "a", 1)
    _version(tmp_path, "b", 1)
    _version(tmp_path, "b", 2)

    def publish() -> str:
        _version(tmp_path, "a", 2)
        _version(tmp_path, "b", 3)
        return "published"

    with pytest.raises(SwapError):
        publish_and_load(tmp_path, f"127.0.0.1:{free_port()}", ["a", "b"], publish)
    assert versions(tmp_path, "a") == [1] and versions(tmp_path, "b") == [1, 2]
    assert (tmp_path / "b" / "2" / "weights").read_text() == "b v2"


def test_a_failed_publish_removes_what_it_had_written(tmp_path: Path) -> None:
    _version(tmp_path, "a", 1)

    def publish() -> None:
        _version(tmp_path, "a", 2)
        raise OSError("disk full")

    with pytest.raises(SwapError, match="disk full"):
        publish_and_load(tmp_path, f"127.0.0.1:{free_port()}", ["a"], publish)
    assert versions(tmp_path, "a") == [1]
