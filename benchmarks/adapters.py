"""`fluxserve-bench adapters`: what the per-row LoRA branch (export.flux.adapter_bank) costs.

On the local FLUX build (FluxSettings' checkpoint, "small" by default), in one run: the plain
transformer export and the branch graph (each bank layout) exported from the same weights, then
per-step transformer time for a batch of `batch` rows:
  (a) the plain graph;  (b) the branch graph, slot 0 on every row;
  (c) every row on one adapter;  (d) every row on a different adapter (4 distinct at batch 4),
for fp32 and for the int8 graphs built the way the served int8 transformer is. Every variant runs
through an IOBinding (the inputs bound per call, the bank once), interleaved with the others in
rotating order; medians and ratios come from the same run.

Two clocks per step: wall time, and the process's CPU time. On a machine other work shares, a
step's wall time mostly measures how often the scheduler ran us; with one intra-op thread (the
default) its CPU time is the work the step did, which is the cost being compared. Both are kept.
Beside the measurement, the branch's multiply-adds as a share of the transformer's per-token
Linear multiply-adds, for the measured model and at FLUX.1-dev's sizes (the share falls as the
model widens: R * (in + out) against in * out per layer).

Memory: the process's RSS growth as adapters are loaded into a fresh bank, against the bytes of
a bank slot (R-padded) and of the adapter's own tensors.

Writes build/bench/adapters/adapters.json and adapters.md.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.environment import background_load, environment
from benchmarks.report import write_json
from common.adapter_bank import DEFAULT_MAX_RANK, DEFAULT_SLOTS, LAYOUTS, AdapterWeights, Layout
from common.ort_session import make_session
from common.paths import BUILD_DIR
from contract.specs import FLUX_IO_NAMES, FLUX_TRANSFORMER
from export.flux.adapter_bank import (
    ADAPTER_TRANSFORMER,
    export_adapter_transformer,
    quantize_adapter_export,
    read_adapter,
)
from serving.adapter_session import AdapterSession

log = logging.getLogger(__name__)

OUT_DIR = BUILD_DIR / "bench" / "adapters"
GOAL_RATIO = 1.15
"""Issue 27: a batch of 4 distinct adapters costs at most 15% more per step than the plain graph."""
ADAPTERS = 4


@dataclass(frozen=True)
class AdapterBenchSettings:
    checkpoint: Path | None = None
    """A diffusers FLUX folder; None = FluxSettings' local build (what `make models` built)."""
    rank: int = DEFAULT_MAX_RANK
    """The bank's R; the benchmark's adapters are rank R (padding costs the same as rank)."""
    slots: int = DEFAULT_SLOTS
    layouts: tuple[Layout, ...] = LAYOUTS
    batch: int = ADAPTERS
    image_side: int = 256
    repeats: int = 15
    warmup: int = 2
    threads: int = 1
    int8: bool = True
    reuse_exports: bool = False
    """Reuse this folder's exports from an earlier run with the same checkpoint and rank."""
    out: Path = OUT_DIR


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _summary(samples: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_ms": round(statistics.median(samples), 2), "p25_ms": round(q[0], 2), "p75_ms": round(q[2], 2)}


def branch_mac_share(transformer: torch.nn.Module, layers: Iterable[str], rank: int) -> float:
    """The branch's multiply-adds per token over the transformer blocks' per-token Linear
    multiply-adds (modulation Linears act once per row, attention's T² products are left out:
    an upper bound of the branch's share). A token passes one stream of a double block, so
    those blocks' Linears count half."""
    branch = set(layers)
    base = extra = 0.0
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or "norm" in name:
            continue
        if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        weight = 0.5 if name.startswith("transformer_blocks.") else 1.0
        base += weight * module.in_features * module.out_features
        if name in branch:
            extra += weight * rank * (module.in_features + module.out_features)
    return extra / base


def _mac_shares(transformer: torch.nn.Module, rank: int) -> dict[str, float]:
    """branch_mac_share for the measured model and for FLUX.1-dev's architecture (meta weights)."""
    from diffusers import FluxTransformer2DModel

    from export.flux.adapter_bank import branch_layers
    from export.flux.full_size import DEV_TRANSFORMER

    with torch.device("meta"):
        dev = FluxTransformer2DModel(**DEV_TRANSFORMER)
    return {
        "measured_model": round(branch_mac_share(transformer, branch_layers(transformer), rank), 4),
        "flux1_dev": round(branch_mac_share(dev, branch_layers(dev), rank), 4),
    }


def _plain_step(model: Path, feeds: dict[str, np.ndarray], threads: int) -> Callable[[], np.ndarray]:
    """The plain graph run the way AdapterSession runs the branch graph (IOBinding per call)."""
    session = make_session(model, threads, spinning=True)
    binding = session.io_binding()
    output = session.get_outputs()[0].name

    def step() -> np.ndarray:
        for name in FLUX_IO_NAMES[FLUX_TRANSFORMER][0]:
            binding.bind_cpu_input(name, feeds[name])
        binding.bind_output(output)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    return step


def _interleaved(
    runners: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """clock ("wall", "cpu") -> variant -> per-step milliseconds, variants in rotating order."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    names = list(runners)
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            runners[name]()
            times["cpu"][name].append(1000 * (time.process_time() - cpu))
            times["wall"][name].append(1000 * (time.perf_counter() - wall))
    return times


EXPORTS_MARKER = "exports.json"


def _export_graphs(s: AdapterBenchSettings, transformer: torch.nn.Module, root: Path) -> dict[str, Any]:
    """The plain and branch graphs (fp32, + int8) under `root`; their export figures."""
    from export.flux.onnx_export import export_transformer
    from export.flux.transformer_precision import INT8_DIR, quantize_export

    plain = export_transformer(transformer, root / "plain")
    figures: dict[str, Any] = {
        "plain": {"export_s": round(plain.export_seconds, 1), "max_abs_error": plain.max_abs_error}
    }
    for layout in s.layouts:
        res = export_adapter_transformer(transformer, root / layout, rank=s.rank, layout=layout)
        figures[layout] = {
            "export_s": round(res.export_seconds, 1),
            "max_abs_error": res.max_abs_error,
            "slot0_error": res.slot0_error,
            "bank_inputs": len(res.layout.bank_inputs()),
            "branch_layers": len(res.layout.layers),
        }
    if s.int8:
        started = time.monotonic()
        quantize_export(root / "plain" / FLUX_TRANSFORMER, root / "plain" / FLUX_TRANSFORMER / INT8_DIR)
        for layout in s.layouts:
            quantize_adapter_export(root / layout / ADAPTER_TRANSFORMER)
        figures["int8_build_s"] = round(time.monotonic() - started, 1)
    return figures


def _exports(s: AdapterBenchSettings, checkpoint: Path) -> tuple[torch.nn.Module, dict[str, Path], dict[str, Any]]:
    """(transformer, variant -> folder, export figures), exported now or, with reuse_exports, by an
    earlier run from the same checkpoint files, rank, layouts and precisions."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(checkpoint / "transformer").eval()
    # Absolute: the int8 quantizer changes directory before it resolves its output path.
    root = s.out.resolve() / "export"
    source = {
        "checkpoint": str(checkpoint.resolve()),
        "transformer_files": sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in (checkpoint / "transformer").iterdir()
        ),
        "rank": s.rank,
        "layouts": list(s.layouts),
        "int8": s.int8,
    }
    marker = root / EXPORTS_MARKER
    earlier = json.loads(marker.read_text()) if marker.exists() else None
    if s.reuse_exports and earlier is not None and earlier["source"] == json.loads(json.dumps(source)):
        figures = {**earlier["figures"], "reused_from_earlier_run": True}
    else:
        marker.unlink(missing_ok=True)
        figures = _export_graphs(s, transformer, root)
        write_json({"source": source, "figures": figures}, marker)
    folders = {"plain": root / "plain" / FLUX_TRANSFORMER} | {
        layout: root / layout / ADAPTER_TRANSFORMER for layout in s.layouts
    }
    return transformer, folders, figures


def _adapters(s: AdapterBenchSettings, checkpoint: Path, layout_dir: Path) -> tuple[list[AdapterWeights], list[int]]:
    """ADAPTERS random rank-R LoRA files (the local LoRA builder, other seeds), read for the bank."""
    from common.adapter_bank import BankLayout
    from export.flux.lora import build_local_lora

    layout = BankLayout.load(layout_dir)
    weights, file_bytes = [], []
    for k in range(ADAPTERS):
        folder = build_local_lora(checkpoint, s.out / "loras" / f"lora-{k + 1}", rank=s.rank, seed=100 + k)
        weights.append(read_adapter(folder, layout))
        file_bytes.append(sum(f.stat().st_size for f in folder.glob("*.safetensors")))
    return weights, file_bytes


def _runners(
    s: AdapterBenchSettings, folders: dict[str, Path], adapters: list[AdapterWeights], feeds: dict[str, np.ndarray]
) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """Variant name -> one step; and the max |slot 0 - plain| seen per branch graph (a sanity check)."""
    from export.flux.transformer_precision import INT8_DIR

    runners: dict[str, Callable[[], object]] = {}
    slot0_vs_plain: dict[str, float] = {}
    one, distinct = [1] * s.batch, [1 + i % ADAPTERS for i in range(s.batch)]
    for precision in ("fp32", "int8") if s.int8 else ("fp32",):
        sub = INT8_DIR if precision == "int8" else "."
        plain = _plain_step(folders["plain"] / sub / "model.onnx", feeds, s.threads)
        runners[f"{precision}/plain"] = plain
        for layout in s.layouts:
            sess = AdapterSession(folders[layout] / sub / "model.onnx", s.slots, s.threads, spinning=True)
            for slot, adapter in enumerate(adapters, start=1):
                sess.load(slot, adapter)
            ones = [1.0] * s.batch
            for name, rows in (("slot0", [0] * s.batch), ("one", one), ("distinct", distinct)):
                runners[f"{precision}/{layout}/{name}"] = lambda sess=sess, rows=rows: sess.run(feeds, rows, ones)
            slot0_vs_plain[f"{precision}/{layout}"] = float(
                np.abs(sess.run(feeds, [0] * s.batch, ones) - plain()).max()
            )
    return runners, slot0_vs_plain


def _memory(
    s: AdapterBenchSettings, folder: Path, adapters: list[AdapterWeights], file_bytes: list[int]
) -> dict[str, Any]:
    """RSS growth per adapter loaded into a fresh bank, beside its slot's and its own bytes."""
    sess = AdapterSession(folder / "model.onnx", s.slots, s.threads)
    gc.collect()
    before = _rss_bytes()
    growth = []
    for slot, adapter in enumerate(adapters, start=1):
        sess.load(slot, adapter)
        gc.collect()
        now = _rss_bytes()
        growth.append(now - before)
        before = now
    return {
        "layout": sess.layout.layout,
        "slots": s.slots,
        "slot_bytes": sess.layout.slot_bytes(),
        "bank_bytes_all_slots": sess.layout.slot_bytes() * s.slots,
        "adapter_tensor_bytes": [a.nbytes for a in adapters],
        "adapter_file_bytes": file_bytes,
        "rss_growth_bytes": growth,
    }


def _ratios(
    steps: dict[str, dict[str, Any]], precisions: tuple[str, ...], layouts: tuple[str, ...]
) -> dict[str, float]:
    """Median over the plain graph's median, per variant; and 4 distinct adapters over 1."""
    out: dict[str, float] = {}
    for precision in precisions:
        base = steps[f"{precision}/plain"]["median_ms"]
        for layout in layouts:
            key = f"{precision}/{layout}"
            for variant in ("slot0", "one", "distinct"):
                out[f"{key}/{variant}"] = round(steps[f"{key}/{variant}"]["median_ms"] / base, 3)
            out[f"{key}/distinct_vs_one"] = round(
                steps[f"{key}/distinct"]["median_ms"] / steps[f"{key}/one"]["median_ms"], 3
            )
    return out


def bench_adapters(s: AdapterBenchSettings) -> dict[str, Any]:
    from common.flux_assets import read_max_sequence_length
    from export.flux.onnx_export import transformer_inputs
    from export.flux.settings import FluxSettings

    checkpoint = s.checkpoint or FluxSettings().local_checkpoint_dir
    if not (checkpoint / "transformer").is_dir():
        raise FileNotFoundError(f"{checkpoint}: no FLUX checkpoint (run `make models`, or pass --checkpoint)")
    started_utc = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = background_load()
    transformer, folders, export_figures = _exports(s, checkpoint)
    adapters, file_bytes = _adapters(s, checkpoint, folders[s.layouts[0]])
    latent = s.image_side // 8
    text_len = read_max_sequence_length(checkpoint)
    feeds = transformer_inputs(transformer, s.batch, latent, latent, text_len, seed=0)
    memory = _memory(s, folders[s.layouts[0]], adapters, file_bytes)
    runners, slot0_vs_plain = _runners(s, folders, adapters, feeds)
    times = _interleaved(runners, s.repeats, s.warmup)
    precisions = ("fp32", "int8") if s.int8 else ("fp32",)
    steps = {clock: {name: _summary(t) for name, t in per.items()} for clock, per in times.items()}
    result = {
        "kind": "adapters",
        "started_utc": started_utc,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "checkpoint": str(checkpoint),
        "step": {
            "batch": s.batch,
            "image_side": s.image_side,
            "image_tokens": (latent // 2) ** 2,
            "text_len": text_len,
        },
        "exports": export_figures,
        "slot0_vs_plain_max_abs": slot0_vs_plain,
        "branch_mac_share": _mac_shares(transformer, s.rank),
        "steps": steps,
        "ratios_vs_plain": {clock: _ratios(steps[clock], precisions, s.layouts) for clock in steps},
        "goal_max_ratio": GOAL_RATIO,
        "memory": memory,
        "background_load_at_start": load,
        "background_load_at_end": background_load(),
        "environment": environment({}),
    }
    write_json(result, s.out / "adapters.json")
    (s.out / "adapters.md").write_text(render_markdown(result))
    return result


def _table(r: dict[str, Any], clock: str) -> list[str]:
    steps, ratios = r["steps"][clock], r["ratios_vs_plain"][clock]

    def cell(name: str) -> str:
        ratio = ratios.get(name)
        return f"{steps[name]['median_ms']:.0f}" + (f" ({ratio:.2f}×)" if ratio is not None else "")

    rows = [
        "| precision | bank layout | plain graph | branch, slot 0 | 1 adapter | 4 distinct adapters | 4 vs 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for precision in ("fp32", "int8"):
        if f"{precision}/plain" not in steps:
            continue
        for layout in r["settings"]["layouts"]:
            key = f"{precision}/{layout}"
            rows.append(
                f"| {precision} | {layout} ({r['exports'][layout]['bank_inputs']} inputs) | {cell(f'{precision}/plain')} "
                f"| {cell(key + '/slot0')} | {cell(key + '/one')} | {cell(key + '/distinct')} "
                f"| {ratios[key + '/distinct_vs_one']:.2f}× |"
            )
    return rows


def render_markdown(r: dict[str, Any]) -> str:
    st, m, step, share = r["settings"], r["memory"], r["step"], r["branch_mac_share"]
    mib = 2**20
    growth = ", ".join(f"{g / mib:.2f}" for g in m["rss_growth_bytes"])
    busy = [r[k].get("cpu_busy_fraction") for k in ("background_load_at_start", "background_load_at_end")]
    return "\n".join(
        [
            f"### Per-request LoRA adapters: cost of the branch ({r['started_utc']})",
            "",
            f"Transformer step, batch {step['batch']} ({step['image_side']}×{step['image_side']} px, "
            f"{step['image_tokens']} image + {step['text_len']} text tokens), rank R = {st['rank']}, "
            f"{r['exports'][st['layouts'][0]]['branch_layers']} branch layers, {st['threads']} intra-op thread(s); "
            f"median of {st['repeats']} interleaved steps, ms (× the plain graph). Goal: 4 distinct adapters "
            f"≤ {r['goal_max_ratio']:.2f}× the plain graph. CPU busy with other work at start / end: {busy[0]} / {busy[1]}.",
            "",
            "CPU time per step (the work a step does):",
            "",
            *_table(r, "cpu"),
            "",
            "Wall time per step (includes waiting for cores other work holds):",
            "",
            *_table(r, "wall"),
            "",
            f"The branch's multiply-adds over the blocks' per-token Linear multiply-adds at rank {st['rank']}: "
            f"{100 * share['measured_model']:.1f}% on this model, {100 * share['flux1_dev']:.1f}% at FLUX.1-dev's sizes.",
            "",
            f"Memory ({m['layout']} bank, {m['slots']} slots): a slot holds {m['slot_bytes'] / mib:.2f} MiB "
            f"(every branch layer at rank {st['rank']}); each adapter's own tensors "
            f"{m['adapter_tensor_bytes'][0] / mib:.2f} MiB (file {m['adapter_file_bytes'][0] / mib:.2f} MiB); "
            f"RSS growth per adapter loaded: {growth} MiB.",
            "",
        ]
    )
