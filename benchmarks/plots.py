"""PNG plots of a run (matplotlib, Agg): latency distribution per target, throughput vs clients."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from benchmarks.load import LoadStats

log = logging.getLogger(__name__)

# (target name, mode, concurrency or rate) -> the run's raw statistics
RawRuns = Mapping[tuple[str, str, float], LoadStats]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks(axis) -> None:
    """Log axes label ticks as 20, 50, 100 rather than 2x10^1; of the minor ticks only 2x and 5x
    are labelled, so a range of several decades does not print its labels on top of each other."""
    import math

    from matplotlib.ticker import FuncFormatter

    def minor(v: float, _pos: int) -> str:
        return f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def latency_plot(raw: RawRuns, model: str, concurrency: int, rate: float | None, path: Path) -> Path | None:
    """Latency CDFs per target: closed loop at `concurrency` clients and open loop at `rate`."""
    panels = [("closed", float(concurrency), f"closed loop, {concurrency} clients")]
    if rate:
        panels.append(("open", float(rate), f"open loop, {rate:g} req/s offered"))
    panels = [p for p in panels if any(k[1] == p[0] and k[2] == p[1] and k[0].endswith(model) for k in raw)]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (mode, load, title) in zip(axes[0], panels):
        for (target, m, value), stats in sorted(raw.items()):
            if m != mode or value != load or not target.endswith(model) or not stats.latencies_s:
                continue
            lat = np.sort(np.asarray(stats.latencies_s) * 1000.0)
            ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=f"{target} (p99 {np.percentile(lat, 99):.0f} ms)")
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("fraction of requests ≤ latency")
        ax.set_title(f"{model}: {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_plot(raw: RawRuns, model: str, path: Path, ort_limit: float | None = None) -> Path | None:
    """Throughput against concurrent clients per target (closed loop), with the in-process limit."""
    series: dict[str, list[tuple[float, float]]] = {}
    for (target, mode, value), stats in raw.items():
        if mode == "closed" and target.endswith(model):
            series.setdefault(target, []).append((value, stats.throughput_rps))
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for target, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=target)
    if ort_limit:
        ax.axhline(ort_limit, color="grey", linestyle="--", label=f"ORT in-process limit ({ort_limit:.0f}/s)")
    ax.set_xscale("log", base=2)
    _plain_ticks(ax.xaxis)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests / s")
    ax.set_title(f"{model}: throughput vs concurrency")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
