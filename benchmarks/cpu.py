"""Where the CPU goes during a run: CPU seconds per process group, from the kernel's own counters.

On a 2-core machine the load generator, the facade, Triton's frontend and every python-backend stub
compete for the same cores, so "ms of CPU per request" by group is the profile that explains a
throughput ceiling. Triton's stubs are grouped by the model they serve (their model.py path).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

Snapshot = dict[str, float]


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _child_label(root_label: str, child: psutil.Process) -> str:
    """`triton:<model>` for a python-backend stub (its argv carries <repo>/<model>/<version>/model.py)."""
    try:
        for arg in child.cmdline()[1:3]:
            if arg.endswith("model.py"):
                return f"{root_label}:{Path(arg).parent.parent.name}"
    except psutil.Error:
        pass
    return f"{root_label}:child"


SYSTEM = "_system_busy"
"""Pseudo-group: CPU seconds the whole machine was busy (from /proc/stat), to detect other work."""


def _system_busy_s() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Snapshots of CPU seconds for named process trees (root pid -> label, children grouped)."""

    def __init__(self, roots: Mapping[str, int] | None = None) -> None:
        self.roots: dict[str, int] = {"load_generator": os.getpid(), **(roots or {})}

    def add(self, label: str, pid: int) -> None:
        self.roots[label] = pid

    def snapshot(self) -> Snapshot:
        out: Snapshot = {}
        system = _system_busy_s()
        if system is not None:
            out[SYSTEM] = system
        for label, pid in self.roots.items():
            try:
                root = psutil.Process(pid)
                out[label] = out.get(label, 0.0) + _cpu_s(root)
                if label == "load_generator":
                    continue  # our own children are the servers, counted under their own labels
                for child in root.children(recursive=True):
                    key = _child_label(label, child)
                    out[key] = out.get(key, 0.0) + _cpu_s(child)
            except psutil.Error as e:
                log.debug("cpu snapshot of %s (%d) failed: %s", label, pid, e)
        return out


def cpu_delta(before: Snapshot, after: Snapshot, wall_s: float, requests: int) -> dict[str, object]:
    """CPU seconds per group over a run, per request (ms), and the share of all cores used."""
    used = {k: max(0.0, after.get(k, 0.0) - before.get(k, 0.0)) for k in after if k != SYSTEM}
    total = sum(used.values())
    system = after.get(SYSTEM, 0.0) - before.get(SYSTEM, 0.0) if SYSTEM in before and SYSTEM in after else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_request = {k: round(v * 1000 / requests, 3) for k, v in sorted(used.items())} if requests else {}
    return {
        "cpu_s": {k: round(v, 3) for k, v in sorted(used.items())},
        "cpu_ms_per_request": per_request,
        "total_cpu_ms_per_request": round(total * 1000 / requests, 3) if requests else None,
        "cores_busy": round(total / wall_s, 3) if wall_s > 0 else None,
        "cores": cores,
        # Busy cores not accounted to the measured processes: other work on the machine (should be ~0).
        "other_cores_busy": round(max(0.0, system - total) / wall_s, 3) if system is not None and wall_s > 0 else None,
    }
