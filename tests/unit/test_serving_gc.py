"""A serving facade tunes the garbage collector (common.collector.freeze_startup_objects); a test process
must not (frozen objects are never freed), so the check runs in a process of its own."""

from __future__ import annotations

import subprocess
import sys

from common.collector import GC_THRESHOLDS
from common.paths import PROJECT_ROOT

PROBE = """
import gc
before = gc.get_freeze_count()
from common.collector import freeze_startup_objects
freeze_startup_objects()
print(before, gc.get_freeze_count() > 0, gc.get_threshold())
"""


def test_freeze_moves_startup_objects_out_of_collections_and_sets_the_thresholds() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=120
    ).stdout.split(maxsplit=2)
    assert out[0] == "0" and out[1] == "True" and out[2].strip() == str(GC_THRESHOLDS)


TUNED_PROBE = """
import gc
from common.collector import collector_tuned
before = gc.get_threshold()
with collector_tuned():
    inside = (gc.get_freeze_count() > 0, gc.get_threshold())
print(inside[0], inside[1] == before, gc.get_freeze_count(), gc.get_threshold() == before)
"""


def test_a_load_generator_tunes_the_collector_for_its_run_only() -> None:
    """benchmarks.load: the generator's own pauses would count as the server's latency; after the
    run its process collects as before (nothing stays frozen)."""
    out = subprocess.run(
        [sys.executable, "-c", TUNED_PROBE], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out == ["True", "False", "0", "True"]
