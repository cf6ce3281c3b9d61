"""A serving facade tunes the garbage collector (api.app.freeze_startup_objects); a test process
must not (frozen objects are never freed), so the check runs in a process of its own."""

from __future__ import annotations

import subprocess
import sys

from api.app import GC_THRESHOLDS
from common.paths import PROJECT_ROOT

PROBE = """
import gc
before = gc.get_freeze_count()
from api.app import freeze_startup_objects
freeze_startup_objects()
print(before, gc.get_freeze_count() > 0, gc.get_threshold())
"""


def test_freeze_moves_startup_objects_out_of_collections_and_sets_the_thresholds() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=120
    ).stdout.split(maxsplit=2)
    assert out[0] == "0" and out[1] == "True" and out[2].strip() == str(GC_THRESHOLDS)
