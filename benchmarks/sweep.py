"""`fluxserve-bench sweep`: measure deployment candidates for the classifier, recommend one.

Two stages. First the `classify` model's dynamic batching (max_queue_delay_us, preferred batch
sizes) at the current instance layout; then, at the batching chosen, instance layouts (`classify`
instances, `classifier_onnx` instances, ORT intra-op threads per instance). Each candidate is
written with the export code's own deployment spec and config writer into a temporary copy of the
model repository (weights hard-linked, configs rewritten), reloaded into the sweep's one Triton
(explicit model control reloads a model whose config changed), and loaded with `concurrency` gRPC
clients. Best throughput wins; within `tie_tolerance` of the best, the
shortest queue delay (batching) or the least CPU per request (layouts) wins. The result goes to
data/recommended_batching.json (common.paths.RECOMMENDED_BATCHING_FILE), which export/deployments.py reads as the classifier's defaults.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import servers
from benchmarks.cpu import CpuMeter, cpu_delta
from benchmarks.environment import cpu_model
from benchmarks.load import closed_loop
from benchmarks.metrics_scrape import model_deltas, scrape
from benchmarks.targets import GrpcClassify
from benchmarks.workload import chat_texts
from common.paths import BUILD_DIR, RECOMMENDED_BATCHING_FILE
from contract.specs import CLASSIFIER_ONNX, CLASSIFY
from export.deployments import ExportSettings, classifier_deployments
from export.triton_config import DynamicBatching, parse_config
from publish.model_control import load_models
from publish.repository import write_config
from runtime.launcher import TritonServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Processes and threads serving the classifier: on 2 shared cores these decide how much of
    the CPU goes to Python stubs, IPC and idle ORT threads rather than to the encoder."""

    classify_instances: int
    onnx_instances: int
    onnx_threads: int

    @property
    def label(self) -> str:
        return f"classify x{self.classify_instances} onnx x{self.onnx_instances} threads={self.onnx_threads}"

    @classmethod
    def parse(cls, text: str) -> Layout:
        """ "CLASSIFY_INSTANCES,ONNX_INSTANCES,ONNX_THREADS" (e.g. "2,1,2")."""
        a, b, c = (int(x) for x in text.split(","))
        if min(a, b, c) < 1:
            raise ValueError(f"instance and thread counts must be >= 1: {text!r}")
        return cls(a, b, c)

    @classmethod
    def current(cls, settings: ExportSettings | None = None) -> Layout:
        """The layout the export writes today (explicit settings, else the committed recommendation)."""
        deps = classifier_deployments(settings)
        onnx = deps[CLASSIFIER_ONNX.name]
        return cls(deps[CLASSIFY.name].instance_count, onnx.instance_count, int(onnx.parameters["intra_op_threads"]))


@dataclass(frozen=True)
class Candidate:
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...] = ()
    layout: Layout | None = None
    """None: the current layout (`Layout.current`)."""

    @property
    def batching_label(self) -> str:
        return f"delay={self.max_queue_delay_us}us preferred={list(self.preferred_batch_sizes)}"

    @property
    def label(self) -> str:
        return self.batching_label if self.layout is None else f"{self.batching_label} {self.layout.label}"

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """ "DELAY_US" or "DELAY_US:B1,B2,..." (e.g. "2000:8,16,32")."""
        delay, _, sizes = text.partition(":")
        return cls(int(delay), tuple(int(b) for b in sizes.split(",") if b.strip()))


DEFAULT_CANDIDATES: tuple[Candidate, ...] = (
    Candidate(0),
    Candidate(500),
    Candidate(2000),
    Candidate(5000),
    Candidate(2000, (8, 16, 32)),
    Candidate(5000, (16, 32)),
)

DEFAULT_LAYOUTS: tuple[Layout, ...] = (
    Layout(1, 1, 2),
    Layout(2, 1, 2),
    Layout(2, 1, 1),
    Layout(2, 2, 1),
    Layout(3, 1, 2),
    Layout(1, 2, 1),
)


@dataclass(frozen=True)
class SweepSettings:
    candidates: tuple[Candidate, ...] = DEFAULT_CANDIDATES
    layouts: tuple[Layout, ...] = DEFAULT_LAYOUTS
    """Measured at the batching chosen from `candidates`; empty: keep the current layout."""
    concurrency: int = 32
    duration_s: float = 8.0
    warmup_s: float = 2.0
    repeats: int = 1
    """Rounds over all candidates (interleaved, so drift hits every candidate alike); medians are kept."""
    tie_tolerance: float = 0.03
    model_repository: Path = servers.MODEL_REPOSITORY
    out: Path = RECOMMENDED_BATCHING_FILE
    log_dir: Path = servers.LOG_DIR


def copy_classifier_models(src: Path, dst: Path) -> None:
    """The classifier's models into `dst`; files hard-linked where possible, configs copied."""

    def link_or_copy(s: str, d: str) -> None:
        if s.endswith(".pbtxt"):
            shutil.copy2(s, d)
            return
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    for name in servers.CLASSIFY_STACK:
        shutil.copytree(
            src / name,
            dst / name,
            copy_function=link_or_copy,
            ignore=shutil.ignore_patterns(".staging-*", "__pycache__"),
        )


def write_candidate(repo: Path, cand: Candidate) -> None:
    """Write classify/classifier_onnx configs for `cand` with the export code's spec and writer.

    Parameters the published configs carry (the uncertainty threshold) are kept.
    """
    layout = cand.layout or Layout.current()
    settings = ExportSettings(
        classify_max_queue_delay_us=cand.max_queue_delay_us,
        classify_preferred_batch_sizes=cand.preferred_batch_sizes or None,
        classify_instances=layout.classify_instances,
        classifier_onnx_instances=layout.onnx_instances,
        classifier_onnx_threads=layout.onnx_threads,
    )
    for name, dep in classifier_deployments(settings).items():
        published = parse_config((repo / name / "config.pbtxt").read_text())
        params = {k: v.string_value for k, v in published.parameters.items()}
        dep = replace(dep, parameters={**params, **dep.parameters})
        if name == CLASSIFY.name:
            # Explicit, so an empty candidate list is not replaced by a previous recommendation.
            dep = replace(dep, dynamic_batching=DynamicBatching(cand.preferred_batch_sizes, cand.max_queue_delay_us))
        write_config(repo, dep, "cpu")


async def _load(grpc_url: str, texts: list[str], s: SweepSettings, metrics_url: str, meter: CpuMeter) -> dict[str, Any]:
    target = GrpcClassify(grpc_url, texts)
    try:
        await closed_loop(target, s.concurrency, s.warmup_s, 100_000)
        before, cpu_before = scrape(metrics_url), meter.snapshot()
        stats = await closed_loop(target, s.concurrency, s.duration_s, 1_000_000)
        cpu = cpu_delta(cpu_before, meter.snapshot(), stats.wall_s, stats.ok)
        deltas = model_deltas(before, scrape(metrics_url), servers.CLASSIFY_STACK)
    finally:
        await target.aclose()
    summary = stats.summary()
    return {k: summary[k] for k in ("ok", "errors", "throughput_rps", "p50_ms", "p90_ms", "p99_ms")} | {
        "classify_avg_batch": deltas[CLASSIFY.name]["avg_batch"],
        "classifier_onnx_avg_batch": deltas[servers.CLASSIFY_STACK[1]]["avg_batch"],
        "classify_avg_queue_us": deltas[CLASSIFY.name]["avg_queue_us"],
        "cpu_ms_per_request": cpu["total_cpu_ms_per_request"],
        # Other work on the machine during this candidate: a candidate measured beside it looks worse.
        "other_cores_busy": cpu["other_cores_busy"],
    }


def measure_candidate(
    triton: TritonServer, workdir: Path, cand: Candidate, texts: list[str], s: SweepSettings
) -> dict[str, Any]:
    """`cand`'s configs written and loaded into the sweep's one Triton (explicit model control
    reloads a model whose config changed, instances included), then measured."""
    write_candidate(workdir, cand)
    load_models(triton.http_url, [CLASSIFIER_ONNX.name, CLASSIFY.name])
    m = asyncio.run(_load(triton.grpc_url, texts, s, triton.metrics_url, CpuMeter({"triton": triton.process.pid})))
    log.info(
        "%s: %.1f req/s, p99 %.1f ms, avg batch %s, %d errors, other work %s cores",
        cand.label,
        m["throughput_rps"],
        m["p99_ms"],
        m["classify_avg_batch"],
        m["errors"],
        m["other_cores_busy"],
    )
    return m


def choose(measured: dict[Candidate, dict[str, Any]], tie_tolerance: float) -> Candidate:
    """Highest throughput; within `tie_tolerance` of it, the shortest queue delay, then the lowest
    p99. Erroring candidates lose.

    The delay breaks ties first because it is what a request pays when it arrives alone: the
    sweep loads the server at its busiest, where every candidate fills batches, but at low load a
    request waits up to max_queue_delay_us for company that never comes.
    """
    clean = {c: m for c, m in measured.items() if m["errors"] == 0} or measured
    best = max(m["throughput_rps"] for m in clean.values())
    tied = [c for c, m in clean.items() if m["throughput_rps"] >= best * (1 - tie_tolerance)]
    return min(tied, key=lambda c: (c.max_queue_delay_us, clean[c]["p99_ms"]))


def choose_layout(measured: dict[Candidate, dict[str, Any]], tie_tolerance: float) -> Candidate:
    """Highest throughput; within `tie_tolerance` of it, the least CPU per request (what the other
    work on the machine keeps), then the lowest p99. Erroring candidates lose."""
    clean = {c: m for c, m in measured.items() if m["errors"] == 0} or measured
    best = max(m["throughput_rps"] for m in clean.values())
    tied = [c for c, m in clean.items() if m["throughput_rps"] >= best * (1 - tie_tolerance)]
    return min(tied, key=lambda c: (clean[c].get("cpu_ms_per_request") or 0.0, clean[c]["p99_ms"]))


def _median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if len(runs) == 1:
        return dict(runs[0])
    keys = ("throughput_rps", "p50_ms", "p90_ms", "p99_ms", "cpu_ms_per_request")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["errors"] = sum(r["errors"] for r in runs)
    out["ok"] = sum(r["ok"] for r in runs)
    out["other_cores_busy"] = max((r["other_cores_busy"] or 0.0) for r in runs)
    out["runs"] = list(runs)
    return out


def _measure_all(
    triton: TritonServer, workdir: Path, candidates: Sequence[Candidate], texts: list[str], s: SweepSettings
) -> dict[Candidate, dict[str, Any]]:
    """Every candidate `s.repeats` times, interleaved (drift hits all alike); medians kept."""
    runs: dict[Candidate, list[dict[str, Any]]] = {c: [] for c in candidates}
    for round_ in range(s.repeats):
        for cand in candidates:
            log.info("sweep round %d/%d: %s", round_ + 1, s.repeats, cand.label)
            runs[cand].append(measure_candidate(triton, workdir, cand, texts, s))
    return {c: _median_run(r) for c, r in runs.items()}


def sweep(s: SweepSettings) -> dict[str, Any]:
    started = time.monotonic()
    if not servers.stack_built(s.model_repository, servers.CLASSIFY_STACK):
        raise RuntimeError(f"classify is not built in {s.model_repository}: run `make models`")
    texts = chat_texts()
    scratch_root = BUILD_DIR  # same filesystem as the repository, so weights hard-link
    scratch_root.mkdir(parents=True, exist_ok=True)
    current = Layout.current()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-", dir=scratch_root) as tmp:
        workdir = Path(tmp)
        copy_classifier_models(s.model_repository, workdir)
        candidates = tuple(replace(c, layout=c.layout or current) for c in s.candidates)
        with servers.triton(workdir, servers.CLASSIFY_STACK, s.log_dir, tag="sweep") as triton:
            measured = _measure_all(triton, workdir, candidates, texts, s)
            best = choose(measured, s.tie_tolerance)
            layouts = tuple(replace(best, layout=layout) for layout in s.layouts)
            todo = tuple(c for c in layouts if c not in measured)
            measured_layouts = _measure_all(triton, workdir, todo, texts, s)
        measured_layouts |= {c: measured[c] for c in layouts if c in measured}
    if measured_layouts:
        best = choose_layout(measured_layouts, s.tie_tolerance)
    assert best.layout is not None
    recommendation = {
        "classify": {
            "max_queue_delay_us": best.max_queue_delay_us,
            "preferred_batch_sizes": list(best.preferred_batch_sizes),
            "instances": best.layout.classify_instances,
        },
        "classifier_onnx": {"instances": best.layout.onnx_instances, "intra_op_threads": best.layout.onnx_threads},
        "measured": {c.batching_label: m for c, m in measured.items()},
        "measured_layouts": {c.layout.label: m for c, m in measured_layouts.items() if c.layout is not None},
        "method": {
            "door": "Triton gRPC (tritonclient.grpc.aio), closed loop",
            "concurrency": s.concurrency,
            "duration_s": s.duration_s,
            "repeats": s.repeats,
            "rule": (
                f"batching: max throughput; within {s.tie_tolerance:.0%} of it, shortest queue delay, then lowest p99."
                f" Layouts, at that batching: max throughput; within {s.tie_tolerance:.0%} of it, least CPU per"
                " request, then lowest p99"
            ),
            "selected": best.label,
            "batching_measured_at": current.label,
            "cpu": cpu_model(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "measured_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "elapsed_s": round(time.monotonic() - started, 1),
        },
    }
    s.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = s.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(recommendation, indent=2) + "\n")
    tmp_out.replace(s.out)
    log.info("recommended for classify: %s (written to %s)", best.label, s.out)
    return recommendation
