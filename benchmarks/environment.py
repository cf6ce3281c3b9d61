"""Facts about the machine and the models that a benchmark figure depends on."""

from __future__ import annotations

import logging
import os
import platform
import time
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES: tuple[str, ...] = (
    "torch",
    "onnxruntime",
    "tritonclient",
    "transformers",
    "diffusers",
    "nvidia-pytriton",
    "fastapi",
    "uvicorn",
    "uvloop",
    "aiohttp",
    "grpcio",
    "numpy",
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def cpu_busy_fraction(sample_s: float = 1.0) -> float | None:
    """Share of all cores busy over `sample_s` (from /proc/stat): other work skews every figure."""

    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = read()
        time.sleep(sample_s)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    dt = total1 - total0
    return round(1 - (idle1 - idle0) / dt, 3) if dt > 0 else None


def wait_until_idle(max_wait_s: float, busy_below: float = 0.15, sample_s: float = 3.0) -> float | None:
    """Wait (up to `max_wait_s`) for the machine to be nearly idle; returns the last busy share seen."""
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy_fraction(sample_s)
    while busy is not None and busy >= busy_below and time.monotonic() < deadline:
        log.info("machine %.0f%% busy with other work; waiting for it to settle", busy * 100)
        time.sleep(5.0)
        busy = cpu_busy_fraction(sample_s)
    return busy


def background_load() -> dict[str, object]:
    """What else the machine was doing when a run started (should be ~0 for trustworthy figures)."""
    busy = cpu_busy_fraction()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_busy_fraction": busy, "loadavg_1m": round(load[0], 2) if load else None}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def safetensors_params(model_dir: Path) -> int | None:
    """Parameter count from safetensors headers (no weights loaded)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as fh:
            for key in fh.keys():
                n = 1
                for d in fh.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def _size_mb(paths: list[Path]) -> float:
    return round(sum(p.stat().st_size for p in paths if p.is_file()) / 1e6, 1)


def model_facts(
    classifier_dir: Path, classifier_onnx: Path, repo: Path, generate_models: tuple[str, ...]
) -> dict[str, object]:
    facts: dict[str, object] = {
        "classifier": {
            "checkpoint": str(classifier_dir),
            "params": safetensors_params(classifier_dir) if classifier_dir.is_dir() else None,
            "safetensors_mb": _size_mb(list(classifier_dir.glob("*.safetensors"))),
            "onnx_mb": _size_mb([classifier_onnx]) if classifier_onnx.exists() else None,
        }
    }
    onnx_files = [p for m in generate_models if (repo / m).is_dir() for p in (repo / m).rglob("*.onnx*")]
    if onnx_files:
        facts["generate"] = {"component_onnx_mb": _size_mb(onnx_files), "components": list(generate_models)}
    return facts


def environment(models: dict[str, object]) -> dict[str, object]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_gib": memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "models": models,
    }
