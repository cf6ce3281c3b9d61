"""`make test`'s pytest: the whole suite as two pytest processes side by side.

The foreground lane (tests/integration, tests/e2e, tests/compose: real Triton, facade, workers,
Redis, a browser, sharing session fixtures) runs in order at normal priority, its output on the
terminal. The background lane runs beside it at the lowest CPU priority (nice 19), its output kept
in build/logs/unit-tests.log and printed at the end: the in-process tests (tests/unit) and the
real-stack checks that bring their own servers and scratch folders and compare no timings
(SELF_CONTAINED). The swap benchmark's smoke run stays in the foreground (test_swap_smoke.py): run
beside the training-job tests, its worker shares build/'s ONNX exports and their retention sweep
with them, and a publish there failed. The foreground tests spend much of their time waiting
(servers starting, jobs polling, subprocesses), which leaves a core idle often enough for the background lane to finish within them; at nice 19 it
takes almost no CPU the foreground wants, so the checks that count and compare requests under load
see the machine they would see alone. `xdist -n 2` did the same without the priority, and the
workers starved each other (docs/benchmarks.md, The test suite).

Arguments are passed to both processes (`make test PYTEST_ARGS="-k chat"`); to run one file, call
pytest on it directly. The exit status is the first failure's, or 0 (5, "no tests collected", only
when neither collected anything).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from common.paths import BUILD_DIR, PROJECT_ROOT

REAL_STACK = ("tests/integration", "tests/e2e", "tests/compose")
SELF_CONTAINED = (
    "tests/integration/test_bench_smoke.py",
    "tests/integration/test_bench_gpu_dry_run.py",
    "tests/integration/test_sweep_smoke.py",
    "tests/integration/test_facade_workers.py",
)
"""Real-stack tests that start their own servers in their own scratch folders and assert no
timings or load ratios: the lowest priority costs them time only, so they run in the background
lane, off the foreground's critical path (docs/benchmarks.md, The test suite, has the times)."""
FOREGROUND = (*REAL_STACK, *(f"--ignore={f}" for f in SELF_CONTAINED))
BACKGROUND = ("tests/unit", *SELF_CONTAINED)
UNIT_LOG = BUILD_DIR / "logs" / "unit-tests.log"
NO_TESTS = 5


def _lowest_priority() -> None:
    os.nice(19)


def combined_status(real_stack: int, in_process: int) -> int:
    """The first failure's status; 'no tests' only when neither part collected any."""
    failures = [rc for rc in (real_stack, in_process) if rc not in (0, NO_TESTS)]
    if failures:
        return failures[0]
    return NO_TESTS if real_stack == in_process == NO_TESTS else 0


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", "-ra", "--timeout=900"]
    UNIT_LOG.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with UNIT_LOG.open("wb") as log:
        unit = subprocess.Popen(
            # Its own temporary folder and no shared cache: the two sessions never touch each other's files.
            [*pytest, "--durations=10", "-p", "no:cacheprovider", f"--basetemp={BUILD_DIR / 'pytest-unit'}"]
            + [*argv, *BACKGROUND],
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_lowest_priority,
        )
        try:
            real = subprocess.call([*pytest, "--durations=25", *argv, *FOREGROUND], cwd=PROJECT_ROOT)
        finally:
            in_process = unit.wait()
    waited = time.monotonic() - started
    sys.stdout.write(f"\n===== background lane ({', '.join(BACKGROUND)}; nice 19; {UNIT_LOG}) =====\n")
    sys.stdout.write(UNIT_LOG.read_text(errors="replace"))
    sys.stdout.write(
        f"\n===== both parts done in {waited:.0f} s: foreground exit {real}, background exit {in_process} =====\n"
    )
    sys.stdout.flush()
    return combined_status(real, in_process)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
