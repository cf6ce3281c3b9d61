"""`fluxserve-bench precision`: fp32 vs int8 classifier through both doors, against the baseline
and the in-process ONNX Runtime limit of the *same* graph.

The export leaves both graphs in build/classifier/onnx (`fused.onnx` or `model.onnx` for fp32,
`int8.onnx`). For each, a scratch model repository holds `classify` and `classifier_onnx` exactly
as published except for `model.onnx`, and one `fluxserve-bench run` measures the facade, Triton
gRPC and the in-process limit on that very file (tokenization included in every figure). The
baseline (the prototype's architecture, PyTorch) does not depend on the variant: it runs once.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from benchmarks.report import write_json
from benchmarks.runner import RESULTS_DIR, RunSettings, run
from benchmarks.servers import MODEL_REPOSITORY
from benchmarks.targets import BASELINE, FACADE, ORT_INPROCESS, TRITON
from common.paths import BUILD_DIR
from contract.specs import (
    CLASSIFIER_ONNX,
    CLASSIFY,
    INLINE_ENCODER_PARAMETER,
    RESCUE_ENCODER_PARAMETER,
    RESCUE_MARGIN_PARAMETER,
)
from export.triton_config import parse_config
from publish.repository import versions

log = logging.getLogger(__name__)

ONNX_WORK_DIR = BUILD_DIR / "classifier" / "onnx"
SCRATCH = BUILD_DIR / "bench-precision"


@dataclass(frozen=True)
class PrecisionBenchSettings:
    concurrency: tuple[int, ...] = (32,)
    duration_s: float = 10.0
    out_dir: Path = RESULTS_DIR / "precision"
    model_repository: Path = MODEL_REPOSITORY
    onnx_work_dir: Path = ONNX_WORK_DIR


def variant_graphs(work_dir: Path) -> dict[str, Path]:
    fp32 = work_dir / "fused.onnx" if (work_dir / "fused.onnx").exists() else work_dir / "model.onnx"
    out = {"fp32": fp32, "int8": work_dir / "int8.onnx"}
    missing = [str(p) for p in out.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"run `fluxserve-export classifier` first; missing {missing}")
    return out


def _replace(path: Path, graph: Path) -> None:
    path.unlink()
    os.link(graph, path) if graph.stat().st_dev == path.parent.stat().st_dev else shutil.copy2(graph, path)


def scratch_repository(src_repo: Path, graph: Path, dst: Path, rescued: bool = True) -> Path:
    """`classify` + `classifier_onnx` (newest versions) with `graph` as the served model.onnx, and
    as `classify`'s own encoder where it runs one (the CPU default). `rescued=False` drops the fp32
    rescue of int8's near-boundary rows from `classify` (for the fp32 variant)."""
    shutil.rmtree(dst, ignore_errors=True)
    for model in (CLASSIFY.name, CLASSIFIER_ONNX.name):
        newest = versions(src_repo, model)[-1]
        (dst / model).mkdir(parents=True)
        shutil.copy2(src_repo / model / "config.pbtxt", dst / model / "config.pbtxt")
        shutil.copytree(src_repo / model / str(newest), dst / model / "1", copy_function=os.link)
    _replace(dst / CLASSIFIER_ONNX.name / "1" / "model.onnx", graph)
    config_path = dst / CLASSIFY.name / "config.pbtxt"
    config = parse_config(config_path.read_text())
    inline = config.parameters.get(INLINE_ENCODER_PARAMETER)
    if inline is not None:
        _replace(dst / CLASSIFY.name / "1" / inline.string_value, graph)
    if not rescued and RESCUE_ENCODER_PARAMETER in config.parameters:
        # fp32 needs no fp32 second opinion: this variant runs the graph alone
        for key in (RESCUE_ENCODER_PARAMETER, RESCUE_MARGIN_PARAMETER):
            del config.parameters[key]
        config_path.write_text(text_format.MessageToString(config))
    return dst


def _row(variant: str, name: str, result: dict[str, Any], conc: int) -> dict[str, Any] | None:
    target = result["targets"].get(name)
    if not target:
        return None
    r = next((r for r in target["runs"] if r["mode"] == "closed" and r["concurrency"] == conc), None)
    if r is None:
        return None
    return {
        "variant": variant,
        "target": name,
        "req_s": r["throughput_rps"],
        "p99_ms": r["p99_ms"],
        "errors": r["errors"],
        "cpu_ms_per_request": r["cpu"]["cpu_ms_per_request"],
        "total_cpu_ms": r["cpu"]["total_cpu_ms_per_request"],
    }


def bench_precision(s: PrecisionBenchSettings) -> dict[str, Any]:
    graphs = variant_graphs(s.onnx_work_dir)
    base = RunSettings(concurrency=s.concurrency, duration_s=s.duration_s, rate_rps=None, plots=False)
    conc = max(s.concurrency)
    classify = CLASSIFY.name
    baseline = run(replace(base, targets=(f"{BASELINE}-{classify}",), out_dir=s.out_dir / "baseline"))
    out: dict[str, Any] = {"concurrency": conc, "duration_s": s.duration_s, "rows": [], "ort_limit": {}}
    base_row = _row("pytorch", f"{BASELINE}-{classify}", baseline, conc)
    if base_row:
        out["rows"].append(base_row)
    for variant, graph in graphs.items():
        repo = scratch_repository(s.model_repository, graph, SCRATCH / variant, rescued=variant == "int8")
        res = run(
            replace(
                base,
                targets=(f"{FACADE}-{classify}", f"{TRITON}-{classify}", ORT_INPROCESS),
                model_repository=repo,
                classifier_onnx=graph,
                out_dir=s.out_dir / variant,
            )
        )
        limit = (res.get("ort_inprocess") or {}).get("best_texts_per_s")
        out["ort_limit"][variant] = {
            "graph": str(graph),
            "best_texts_per_s": limit,
            "best_batch_size": (res.get("ort_inprocess") or {}).get("best_batch_size"),
            "layout": "{best_sessions}x{best_threads}".format(**res["ort_inprocess"]) if limit else None,
        }
        for name in (f"{FACADE}-{classify}", f"{TRITON}-{classify}"):
            row = _row(variant, name, res, conc)
            if row:
                row["of_ort_limit"] = round(row["req_s"] / limit, 3) if limit else None
                row["vs_baseline"] = round(row["req_s"] / base_row["req_s"], 2) if base_row else None
                out["rows"].append(row)
    s.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out, s.out_dir / "latest.json")
    (s.out_dir / "latest.md").write_text(render_markdown(out))
    return out


def render_markdown(out: dict[str, Any]) -> str:
    lines = [
        f"Classifier precision, {out['concurrency']} closed-loop clients, {out['duration_s']:.0f} s per point "
        "(tokenization included everywhere):",
        "",
        "| graph | target | req/s | p99 ms | errors | vs baseline | of ORT limit (same graph) | CPU ms / request |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        vs = f"{r['vs_baseline']:.2f}×" if r.get("vs_baseline") else "–"
        of = f"{r['of_ort_limit'] * 100:.0f}%" if r.get("of_ort_limit") else "–"
        lines.append(
            f"| {r['variant']} | {r['target']} | {r['req_s']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {vs} | {of} "
            f"| {r['total_cpu_ms']:.2f} |"
        )
    lines += ["", "| graph | in-process ORT limit texts/s | at batch | sessions x threads |", "|---|---:|---:|---|"]
    for variant, lim in out["ort_limit"].items():
        lines.append(
            f"| {variant} | {lim['best_texts_per_s']} | {lim['best_batch_size']} | {lim.get('layout') or '–'} |"
        )
    groups = sorted({g for r in out["rows"] for g in r["cpu_ms_per_request"]}, key=lambda g: (g != "load_generator", g))
    lines += [
        "",
        "CPU ms per request by process:",
        "",
        "| graph | target | " + " | ".join(f"`{g}`" for g in groups) + " |",
        "|---|---|" + "---:|" * len(groups),
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['variant']} | {r['target']} | "
            + " | ".join(f"{r['cpu_ms_per_request'].get(g, 0):.2f}" for g in groups)
            + " |"
        )
    return "\n".join(lines) + "\n"
