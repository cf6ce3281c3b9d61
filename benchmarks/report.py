"""The result of a run as JSON, the ratios that make it readable, and the docs/benchmarks.md table.

Every served figure is divided by the baseline's figure for the same model and the same load
(closed loop at the same concurrency, or open loop at the same rate) from the same run; classify
throughput is also divided by the in-process ONNX Runtime limit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.targets import BASELINE, FACADE, TRITON
from contract.specs import CLASSIFIER_ONNX, CLASSIFY, FLUX_TRANSFORMER, GENERATE

Result = dict[str, Any]

# The Triton models whose queue/compute split the table shows, per public model.
TRITON_SPLIT_MODELS: dict[str, tuple[str, ...]] = {
    CLASSIFY.name: (CLASSIFY.name, CLASSIFIER_ONNX.name),
    GENERATE.name: (GENERATE.name, FLUX_TRANSFORMER),
}
DOOR_ORDER = {FACADE: 0, TRITON: 1, BASELINE: 2}


def load_key(run: dict[str, Any]) -> tuple[str, float | None]:
    return (run["mode"], run["concurrency"] if run["mode"] == "closed" else run["rate_rps"])


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not math.isfinite(num) or not math.isfinite(den) or den <= 0:
        return None
    return round(num / den, 3)


def add_ratios(result: Result) -> None:
    """Fill `vs_baseline` (and `of_ort_limit` for classify) on every run, in place."""
    ort_best = (result.get("ort_inprocess") or {}).get("best_texts_per_s")
    for target in result["targets"].values():
        base_target = result["targets"].get(f"{BASELINE}-{target['model']}")
        base_runs = {load_key(r): r for r in base_target["runs"]} if base_target else {}
        for run in target["runs"]:
            base = base_runs.get(load_key(run))
            run["vs_baseline"] = {
                "throughput_x": _ratio(run["throughput_rps"], base["throughput_rps"]) if base else None,
                "p50_x": _ratio(run["p50_ms"], base["p50_ms"]) if base else None,
                "p90_x": _ratio(run["p90_ms"], base["p90_ms"]) if base else None,
                "p99_x": _ratio(run["p99_ms"], base["p99_ms"]) if base else None,
            }
            if target["model"] == CLASSIFY.name:
                run["of_ort_limit"] = _ratio(run["throughput_rps"], ort_best)


def headline(result: Result, model: str, concurrency: int) -> dict[str, Any]:
    """The done-when figures for one model at one concurrency (closed loop)."""
    rows: dict[str, Any] = {}
    for name, target in result["targets"].items():
        if target["model"] != model:
            continue
        run = next((r for r in target["runs"] if r["mode"] == "closed" and r["concurrency"] == concurrency), None)
        if run is not None:
            rows[name] = {
                k: run.get(k)
                for k in ("throughput_rps", "p50_ms", "p90_ms", "p99_ms", "errors", "vs_baseline", "of_ort_limit")
            }
    out: dict[str, Any] = {"concurrency": concurrency, "targets": rows}
    facade = rows.get(f"{FACADE}-{model}")
    base = rows.get(f"{BASELINE}-{model}")
    if facade and base:
        out["facade_throughput_x_baseline"] = facade["vs_baseline"]["throughput_x"]
        out["facade_p99_lower_than_baseline"] = (
            facade["p99_ms"] is not None and base["p99_ms"] is not None and facade["p99_ms"] < base["p99_ms"]
        )
    if facade and model == CLASSIFY.name:
        out["facade_of_ort_limit"] = facade.get("of_ort_limit")
    out["gain_over_sequential"] = gain_over_sequential(result, model, concurrency)
    return out


def gain_over_sequential(result: Result, model: str, concurrency: int) -> dict[str, float | None]:
    """Throughput at `concurrency` clients / at 1 client, per target: what concurrent requests
    gain from sharing the server (for generate: step-level batching of the transformer)."""
    gains: dict[str, float | None] = {}
    for name, target in result["targets"].items():
        if target["model"] != model:
            continue
        by_c = {r["concurrency"]: r["throughput_rps"] for r in target["runs"] if r["mode"] == "closed"}
        if 1 in by_c and concurrency in by_c and concurrency != 1:
            gains[name] = _ratio(by_c[concurrency], by_c[1])
    return gains


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(result: Result, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(result), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- markdown


def _num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _x(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _pct(value: Any) -> str:
    return "–" if value is None else f"{value * 100:.0f}%"


def _sorted_targets(result: Result, model: str) -> list[tuple[str, dict[str, Any]]]:
    items = [(n, t) for n, t in result["targets"].items() if t["model"] == model]
    return sorted(items, key=lambda nt: DOOR_ORDER.get(nt[1]["door"], 9))


def _load_table(result: Result, model: str, mode: str) -> list[str]:
    is_classify = model == CLASSIFY.name
    load_col = "clients" if mode == "closed" else "offered req/s"
    head = f"| target | {load_col} | req/s | p50 ms | p90 ms | p99 ms | errors | req/s vs baseline | p99 vs baseline |"
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if is_classify:
        head += " of ORT limit |"
        sep += "---:|"
    lines = [head, sep]
    rows = [(n, t, r) for n, t in _sorted_targets(result, model) for r in t["runs"] if r["mode"] == mode]
    rows.sort(key=lambda ntr: (load_key(ntr[2])[1] or 0, DOOR_ORDER.get(ntr[1]["door"], 9)))
    for name, _target, run in rows:
        load = run["concurrency"] if mode == "closed" else _num(run["rate_rps"], 0)
        vs = run.get("vs_baseline") or {}
        line = (
            f"| {name} | {load} | {_num(run['throughput_rps'])} | {_num(run['p50_ms'])} | {_num(run['p90_ms'])} "
            f"| {_num(run['p99_ms'])} | {run['errors']} | {_x(vs.get('throughput_x'))} | {_x(vs.get('p99_x'))} |"
        )
        if is_classify:
            line += f" {_pct(run.get('of_ort_limit'))} |"
        lines.append(line)
    return lines if len(lines) > 2 else []


def _split_table(result: Result, model: str) -> list[str]:
    models = TRITON_SPLIT_MODELS.get(model, (model,))
    head = (
        "| target | load | " + " | ".join(f"`{m}` queue µs | `{m}` compute µs | `{m}` avg batch" for m in models) + " |"
    )
    sep = "|---|---|" + "---:|---:|---:|" * len(models)
    lines = [head, sep]
    for name, target in _sorted_targets(result, model):
        for run in target["runs"]:
            triton = run.get("triton")
            if not triton:
                continue
            load = f"{run['concurrency']} clients" if run["mode"] == "closed" else f"{_num(run['rate_rps'], 0)} req/s"
            cells = []
            for m in models:
                d = triton.get(m, {})
                cells += [
                    _num(d.get("avg_queue_us"), 0),
                    _num(d.get("avg_compute_infer_us"), 0),
                    _num(d.get("avg_batch"), 2),
                ]
            lines.append(f"| {name} | {load} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def _cpu_table(result: Result, model: str) -> list[str]:
    """CPU ms per request by process group, at the headline concurrency."""
    conc = ((result.get("headline") or {}).get(model) or {}).get("concurrency")
    rows = []
    for name, target in _sorted_targets(result, model):
        run = next((r for r in target["runs"] if r["mode"] == "closed" and r["concurrency"] == conc), None)
        if run and run.get("cpu", {}).get("cpu_ms_per_request"):
            rows.append((name, run["cpu"]))
    if not rows:
        return []
    # Groups that did real work here (idle stubs of the other model's components are left out).
    groups = sorted(
        {g for _, cpu in rows for g, ms in cpu["cpu_ms_per_request"].items() if ms >= 0.05},
        key=lambda g: (g != "load_generator", g),
    )
    lines = [
        f"| target ({conc} clients) | cores busy | CPU ms / request | "
        + " | ".join(f"`{g}`" for g in groups)
        + " | other processes (cores) |",
        "|---|---:|---:|" + "---:|" * len(groups) + "---:|",
    ]
    for name, cpu in rows:
        cells = [_num(cpu["cpu_ms_per_request"].get(g), 2) if g in cpu["cpu_ms_per_request"] else "–" for g in groups]
        lines.append(
            f"| {name} | {_num(cpu.get('cores_busy'), 2)} / {cpu.get('cores')} | "
            f"{_num(cpu.get('total_cpu_ms_per_request'), 2)} | "
            + " | ".join(cells)
            + f" | {_num(cpu.get('other_cores_busy'), 2)} |"
        )
    return lines


CEILING_SHARES: tuple[float, ...] = (0.85, 0.90)
"""Shares of the in-process limit that issue 10 asks of the facade and of Triton gRPC."""


def _cpu_ceiling(result: Result, model: str) -> list[str]:
    """What the measured CPU per request allows at best: every core busy, nothing else running.

    throughput <= cores / CPU per request, so a door's share of the in-process limit can reach at
    most (cores / CPU per request) / limit however well it is scheduled; and a share s of the limit
    leaves each request cores / (s * limit) of CPU in all. Both come from this run's counters.
    """
    ort_best = (result.get("ort_inprocess") or {}).get("best_texts_per_s")
    conc = ((result.get("headline") or {}).get(model) or {}).get("concurrency")
    if model != CLASSIFY.name or not ort_best or not conc:
        return []
    lines = []
    for name, target in _sorted_targets(result, model):
        run = next((r for r in target["runs"] if r["mode"] == "closed" and r["concurrency"] == conc), None)
        cpu = (run or {}).get("cpu") or {}
        total, cores = cpu.get("total_cpu_ms_per_request"), cpu.get("cores")
        if target["door"] == BASELINE or not total or not cores:
            continue
        ceiling = cores * 1000.0 / total
        # The encoder runs in `classifier_onnx` (BLS) or inside `classify` (inline, CPU default):
        # the two python models together are the in-process work the limit measures, plus the BLS.
        per_process = cpu.get("cpu_ms_per_request", {})
        models = [m for m in (CLASSIFY.name, CLASSIFIER_ONNX.name) if per_process.get(f"triton:{m}")]
        in_models = sum(per_process[f"triton:{m}"] for m in models)
        where = " + ".join(f"`{m}`" for m in models) or f"`{CLASSIFIER_ONNX.name}`"
        budgets = ", ".join(f"{s:.0%} {_num(cores * 1000.0 / (s * ort_best), 2)} ms" for s in CEILING_SHARES)
        lines.append(
            f"- {name}: {_num(total, 2)} ms of CPU per request ({_num(in_models, 2)} of them in {where}, "
            "tokenizing and encoding) "
            f"on {cores} cores caps it at {_num(ceiling, 0)} req/s, **{_pct(_ratio(ceiling, ort_best))}** of the "
            f"limit with every core busy. A request may cost, in all: {budgets}."
        )
    if lines:
        lines.insert(0, "Ceiling set by CPU per request (this run's counters; the load generator's share included):")
    return lines


def _per_point(settings: dict[str, Any]) -> str:
    cap = settings.get("max_requests")
    if settings.get("smoke") and cap:
        return f"{cap} requests"
    return f"{settings.get('duration_s')} s"


OTHER_WORK_LIMIT = 0.1
"""Cores' worth of CPU used by processes outside the benchmark above which a figure is flagged."""


def _other_work(result: Result) -> list[tuple[str, str, float]]:
    flagged = []
    for name, target in result["targets"].items():
        for run in target["runs"]:
            other = (run.get("cpu") or {}).get("other_cores_busy")
            if other is not None and other > OTHER_WORK_LIMIT:
                flagged.append(
                    (
                        name,
                        f"{run['concurrency']} clients" if run["mode"] == "closed" else f"{run['rate_rps']:g} req/s",
                        other,
                    )
                )
    return flagged


def _background_note(result: Result) -> list[str]:
    busy = (result.get("background_before_run") or {}).get("cpu_busy_fraction")
    flagged = _other_work(result)
    notes = []
    if busy is not None and busy > 0.2:
        notes.append(f"the machine was {busy * 100:.0f}% busy with other work when the run started")
    if flagged:
        worst = max(flagged, key=lambda f: f[2])
        notes.append(
            f"{len(flagged)} load points ran beside other work (worst: {worst[0]} at {worst[1]}, "
            f"{worst[2]:.2f} cores used by other processes)"
        )
    if notes:
        return ["", f"**Caution:** {'; '.join(notes)}. Those figures understate what this machine can do."]
    return []


def render_markdown(result: Result) -> str:
    """The docs/benchmarks.md section for a run: load tables, Triton's split, the in-process limit, targets met."""
    env = result.get("environment", {})
    settings = result.get("settings", {})
    v = env.get("versions", {})
    out = [
        f"### Benchmark ({result.get('started_utc', '?')}{', smoke' if result.get('smoke') else ''})",
        "",
        f"{env.get('cpu_model', '?')}, {env.get('cpu_affinity') or env.get('cpu_count')} cores; torch {v.get('torch')}, "
        f"onnxruntime {v.get('onnxruntime')}, tritonclient {v.get('tritonclient')}, transformers {v.get('transformers')}. "
        f"Load generator, Triton, facade and baseline share these cores. Closed loop: {_per_point(settings)} per point; "
        f"open loop: Poisson arrivals. Baseline = the prototype's architecture (FastAPI + transformers/diffusers "
        f"pipelines in PyTorch, one request at a time), measured in the same run; ratios are to it at the same load. "
        f"Whole run: {_num(result.get('elapsed_s'), 0)} s.",
        *_background_note(result),
    ]
    for model in (CLASSIFY.name, GENERATE.name):
        if not any(t["model"] == model for t in result["targets"].values()):
            continue
        out += ["", f"#### `{model}`", ""]
        closed = _load_table(result, model, "closed")
        if closed:
            out += ["Closed loop:", "", *closed, ""]
        open_ = _load_table(result, model, "open")
        if open_:
            out += ["Open loop:", "", *open_, ""]
        split = _split_table(result, model)
        if split:
            bls = (
                "compute of `classify` includes its encoder: in its own process when `classifier_onnx` shows no"
                " traffic (CPU default), else its BLS call to `classifier_onnx`"
                if model == CLASSIFY.name
                else "compute of `generate` includes its BLS calls to the FLUX components"
            )
            out += [
                f"Inside Triton (per request, deltas of Triton's own metrics over each run; {bls}):",
                "",
                *split,
                "",
            ]
        cpu = _cpu_table(result, model)
        if cpu:
            out += [
                "Where the CPU goes (CPU time per request by process, from the kernel's counters; "
                "`triton:<model>` are Triton's python-backend stubs):",
                "",
                *cpu,
                "",
            ]
            ceiling = _cpu_ceiling(result, model)
            if ceiling:
                out += [*ceiling, ""]
        head = (result.get("headline") or {}).get(model)
        if head and "facade_throughput_x_baseline" in head:
            line = (
                f"At {head['concurrency']} clients the facade serves **{_x(head['facade_throughput_x_baseline'])}** "
                f"the baseline's throughput with a {'lower' if head.get('facade_p99_lower_than_baseline') else 'higher'} p99"
            )
            if head.get("facade_of_ort_limit") is not None:
                line += f", **{_pct(head['facade_of_ort_limit'])}** of the in-process ORT limit"
            out += [line + ".", ""]
        gains = (head or {}).get("gain_over_sequential") or {}
        if gains:
            out += [
                f"{head['concurrency']} concurrent clients vs 1 (sequential), throughput: "
                + ", ".join(f"{name} **{_x(g)}**" for name, g in gains.items())
                + ".",
                "",
            ]
    ort = result.get("ort_inprocess")
    if ort:
        layouts = sorted({(r["sessions"], r["threads"]) for r in ort["sweep"]})
        sweeps = "; ".join(
            f"{n} session{'s' if n > 1 else ''} x {t} thread{'s' if t > 1 else ''}: "
            + ", ".join(
                f"{r['batch_size']}: {_num(r['texts_per_s'], 0)}"
                for r in ort["sweep"]
                if (r["sessions"], r["threads"]) == (n, t)
            )
            for n, t in layouts
        )
        out += [
            "In-process ONNX Runtime limit (no server, tokenization included, the better of the layouts): "
            f"**{_num(ort['best_texts_per_s'], 0)} texts/s** with {ort['best_sessions']} session(s) x "
            f"{ort['best_threads']} thread(s) at batch {ort['best_batch_size']} (texts/s by batch size: {sweeps}).",
            "",
        ]
    flux = result.get("flux_inprocess")
    if flux:
        runs = ", ".join(f"{r['concurrency']} threads: {_num(r['images_per_s'], 2)}" for r in flux["runs"])
        share = ((result.get("headline") or {}).get(GENERATE.name) or {}).get("facade_of_inprocess")
        precision = flux.get("transformer_precision")
        out += [
            "In-process limit for generate (FluxLoop on the served ONNX files"
            + (f", transformer in {precision}" if precision else "")
            + ", no server, "
            f"{flux['intra_op_threads']} intra-op threads): **{_num(flux['best_images_per_s'], 2)} images/s** ({runs})"
            + (f"; the facade serves **{_pct(share)}** of it." if share is not None else "."),
            "",
        ]
    if result.get("skipped"):
        out += ["Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in result["skipped"].items()) + ".", ""]
    text = "\n".join(out).rstrip() + "\n"
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text
