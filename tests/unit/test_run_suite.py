"""make test's two-part pytest (tests/run_suite.py): which folders each part runs, and the status."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import REAL_STACK_DIRS
from tests.run_suite import IN_PROCESS, NO_TESTS, REAL_STACK, combined_status


def test_the_two_parts_cover_every_test_folder_once() -> None:
    tests = Path(__file__).resolve().parents[1]
    folders = {p.name for p in tests.iterdir() if p.is_dir() and any(p.rglob("test_*.py"))}
    parts = [Path(f).name for f in REAL_STACK + IN_PROCESS]
    assert sorted(parts) == sorted(folders)
    assert {Path(f).name for f in REAL_STACK} == set(REAL_STACK_DIRS)


def test_a_failure_in_either_part_fails_the_run() -> None:
    assert combined_status(0, 0) == 0
    assert combined_status(1, 0) == 1 and combined_status(0, 1) == 1
    assert combined_status(2, 1) == 2  # the first failure's status
    assert combined_status(NO_TESTS, 0) == 0 and combined_status(0, NO_TESTS) == 0  # a selection may empty one part
    assert combined_status(NO_TESTS, 1) == 1
    assert combined_status(NO_TESTS, NO_TESTS) == NO_TESTS
