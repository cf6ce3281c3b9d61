"""make test's two lanes (tests/run_suite.py): every test file runs in exactly one, and the exit status."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import REAL_STACK_DIRS
from tests.run_suite import BACKGROUND, FOREGROUND, NO_TESTS, REAL_STACK, combined_status

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


def _files(args: tuple[str, ...]) -> set[Path]:
    """The test files a pytest with these arguments collects from (folders, files, --ignore)."""
    ignored = {ROOT / a.removeprefix("--ignore=") for a in args if a.startswith("--ignore=")}
    found: set[Path] = set()
    for a in args:
        if a.startswith("--"):
            continue
        path = ROOT / a
        found |= set(path.rglob("test_*.py")) if path.is_dir() else {path}
    return found - ignored


def test_every_test_file_runs_in_exactly_one_lane() -> None:
    fg, bg = _files(FOREGROUND), _files(BACKGROUND)
    assert fg | bg == set(TESTS.rglob("test_*.py"))
    assert not fg & bg
    assert {Path(f).name for f in REAL_STACK} == set(REAL_STACK_DIRS)


def test_a_failure_in_either_part_fails_the_run() -> None:
    assert combined_status(0, 0) == 0
    assert combined_status(1, 0) == 1 and combined_status(0, 1) == 1
    assert combined_status(2, 1) == 2  # the first failure's status
    assert combined_status(NO_TESTS, 0) == 0 and combined_status(0, NO_TESTS) == 0  # a selection may empty one part
    assert combined_status(NO_TESTS, 1) == 1
    assert combined_status(NO_TESTS, NO_TESTS) == NO_TESTS
