"""`fluxserve-bench adapter-mix`: per-request adapters through the real Triton (issue 27).

On a throw-away copy of the model repository (weights hard-linked; its transformer must have the
adapter branch), with its own adapter store of random rank-`rank` LoRAs published by
publish.adapters.publish_adapter, Triton's own `generate` driven over gRPC:

- throughput: closed-loop clients (4 and 8), each request naming one of `distinct` adapters in turn
  (0 = no adapter: the same run without adapters), images/s, and the transformer's inferences per
  execution (Triton's counters: how much step-level batching the mix kept). Every point runs after
  a warm-up that loads its adapters, so it measures serving, not first loads; with more distinct
  adapters than bank slots (slot 0 excluded) the slots churn, which is measured as it is;
- time to serve: publish_adapter of a new LoRA (convert + write the store), then the first image
  naming it (the transformer loads it into a slot on that request), then the same again warm;
- memory: the transformer instances' RSS after a warm-up without adapters and after the runs that
  filled their slots, against the bank's bytes per slot.

Writes benchmarks/results/adapter_mix.json and .md (`fluxserve-bench docs` puts the table into
docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks import servers
from benchmarks.environment import background_load, environment
from benchmarks.report import write_json
from client.triton_client import TritonClient
from common.adapter_bank import DEFAULT_SLOTS
from common.adapter_store import adapters_dir
from common.paths import PROJECT_ROOT
from contract.specs import ADAPTER_SLOTS_PARAMETER, FLUX_TRANSFORMER, GENERATE, GenerateParams
from export.triton_config import parse_config
from publish.repository import versions

log = logging.getLogger(__name__)

RESULT_FILE = PROJECT_ROOT / "benchmarks" / "results" / "adapter_mix.json"
PROMPT = "a lighthouse on a cliff at dusk"


@dataclass(frozen=True)
class AdapterMixSettings:
    clients: tuple[int, ...] = (4, 8)
    distinct: tuple[int, ...] = (0, 1, 4, 8)
    requests_per_client: int = 6
    repeats: int = 2
    """Passes over all points, the order of the adapter counts reversed on every other one (drift
    on a shared machine then weighs on all points alike); a point's figures pool its passes."""
    image_side: int = 128
    steps: int = 4
    rank: int = 4
    model_repository: Path = servers.MODEL_REPOSITORY
    out: Path = RESULT_FILE
    log_dir: Path = servers.LOG_DIR


def _stubs(server_pid: int, version: int) -> list[psutil.Process]:
    """The python-backend stub processes (one per instance) of the transformer's `version` (the
    previous version stays loaded beside it)."""
    out = []
    for p in psutil.Process(server_pid).children(recursive=True):
        try:
            cmd = p.cmdline()
            if (
                cmd
                and "triton_python_backend_stub" in cmd[0]
                and any(f"/{FLUX_TRANSFORMER}/{version}/" in a for a in cmd)
            ):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _rss(stubs: list[psutil.Process]) -> list[int]:
    return [p.memory_info().rss for p in stubs]


def _params(s: AdapterMixSettings, lora: str | None, seed: int) -> GenerateParams:
    return GenerateParams(prompt=PROMPT, width=s.image_side, height=s.image_side, steps=s.steps, seed=seed, lora=lora)


def _counts(metrics_url: str) -> tuple[float, float]:
    """The transformer's (inferences, executions) so far, Triton's own counters."""
    from benchmarks.metrics_scrape import scrape

    snap = scrape(metrics_url)
    return (
        snap.get(("nv_inference_count", FLUX_TRANSFORMER), 0.0),
        snap.get(("nv_inference_exec_count", FLUX_TRANSFORMER), 0.0),
    )


def _point(s: AdapterMixSettings, url: str, metrics_url: str, clients: int, names: list[str]) -> dict[str, Any]:
    """`clients` closed-loop clients; request i of client c names names[(c + i) % len] (none if empty)."""

    def client(c: int) -> list[float]:
        took = []
        with TritonClient(url, timeout_s=600) as tc:
            for i in range(s.requests_per_client):
                lora = names[(c + i) % len(names)] if names else None
                started = time.monotonic()
                result = tc.generate(_params(s, lora, seed=c * 100 + i))
                if result.lora != lora:
                    raise RuntimeError(f"asked for adapter {lora}, the answer names {result.lora}")
                took.append(time.monotonic() - started)
        return took

    before = _counts(metrics_url)
    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for part in pool.map(client, range(clients)) for t in part]
    wall = time.monotonic() - started
    after = _counts(metrics_url)
    return {
        "clients": clients,
        "distinct_adapters": len(names),
        "latencies_s": latencies,
        "wall_s": wall,
        "inferences": after[0] - before[0],
        "executions": after[1] - before[1],
    }


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One point's passes as one figure: images over wall time, all latencies, all executions."""
    latencies = [t for r in runs for t in r["latencies_s"]]
    wall = sum(r["wall_s"] for r in runs)
    executions = sum(r["executions"] for r in runs)
    return {
        "clients": runs[0]["clients"],
        "distinct_adapters": runs[0]["distinct_adapters"],
        "images": len(latencies),
        "wall_s": round(wall, 2),
        "images_per_s": round(len(latencies) / wall, 3),
        "latency_median_s": round(statistics.median(latencies), 3),
        "inferences_per_execution": round(sum(r["inferences"] for r in runs) / executions, 2) if executions else None,
        "passes_images_per_s": [round(len(r["latencies_s"]) / r["wall_s"], 3) for r in runs],
    }


def _time_to_serve(s: AdapterMixSettings, repo: Path, url: str, lora_dir: Path) -> dict[str, Any]:
    from publish.adapters import publish_adapter

    started = time.monotonic()
    record = publish_adapter(lora_dir, "bench-fresh", repository=repo)
    published = time.monotonic()
    with TritonClient(url, timeout_s=600) as tc:
        first = tc.generate(_params(s, record.name, seed=1))
        first_done = time.monotonic()
        tc.generate(_params(s, record.name, seed=1))
        warm_s = time.monotonic() - first_done
        tc.generate(_params(s, None, seed=1))
        plain_s = time.monotonic() - first_done - warm_s
    if first.lora != record.name:
        raise RuntimeError(f"the first image names {first.lora}, not {record.name}")
    return {
        "publish_s": round(published - started, 3),
        "first_image_s": round(first_done - published, 3),
        "warm_image_s": round(warm_s, 3),
        "no_adapter_image_s": round(plain_s, 3),
        "publish_to_first_image_s": round(first_done - started, 3),
        "first_use_over_warm_s": round(first_done - published - warm_s, 3),
    }


def _publish_all(s: AdapterMixSettings, repo: Path, tmp: Path, count: int) -> tuple[list[str], Path]:
    """`count` adapters (random LoRAs on the served checkpoint, seeds 1000..) in the copy's store,
    and one more LoRA folder for the time-to-serve run."""
    from export.flux.lora import build_local_lora
    from publish.adapters import publish_adapter
    from publish.repository import latest_manifest

    manifest = latest_manifest(repo, GENERATE.name) or {}
    checkpoint = Path(manifest["provenance"]["checkpoint"])
    names = []
    for k in range(count + 1):
        folder = build_local_lora(checkpoint, tmp / "loras" / f"lora-{k}", rank=s.rank, seed=1000 + k)
        if k == count:
            return names, folder
        names.append(publish_adapter(folder, f"bench-{k}", repository=repo).name)
    raise AssertionError("unreachable")


def _measure(s: AdapterMixSettings, repo: Path, tmp: Path) -> dict[str, Any]:
    names, fresh = _publish_all(s, repo, tmp, max(s.distinct))
    with servers.triton(repo, servers.GENERATE_STACK, s.log_dir, tag="adapter-mix") as triton:
        url, metrics = triton.grpc_url, triton.metrics_url
        stubs = _stubs(triton.process.pid, versions(repo, FLUX_TRANSFORMER)[-1])
        for clients in s.clients:  # warm: every instance has run the runs' batch sizes, no adapter loaded
            _point(s, url, metrics, clients, [])
        rss_plain = _rss(stubs)
        _point(s, url, metrics, max(s.clients), names)  # every adapter loaded once: serving, not first loads
        rss_adapters = _rss(stubs)
        runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for r in range(s.repeats):
            for distinct in s.distinct if r % 2 == 0 else tuple(reversed(s.distinct)):
                for clients in s.clients:
                    runs.setdefault((clients, distinct), []).append(_point(s, url, metrics, clients, names[:distinct]))
        points = [_pooled(runs[(c, d)]) for d in s.distinct for c in s.clients]
        for p in points:
            log.info("adapter-mix: %s", p)
        rss_loaded = _rss(stubs)
        serve = _time_to_serve(s, repo, url, fresh)
    from publish.adapters import served_bank_layout

    layout = served_bank_layout(repo)
    config = parse_config((repo / FLUX_TRANSFORMER / "config.pbtxt").read_text())
    return {
        "points": points,
        "time_to_serve": serve,
        "memory": {
            "transformer_instances": len(stubs),
            "slot_bytes": layout.slot_bytes(),
            "adapter_slots": int(config.parameters[ADAPTER_SLOTS_PARAMETER].string_value or DEFAULT_SLOTS) - 1,
            "rank": layout.rank,
            "layout": layout.layout,
            "rss_no_adapter_bytes": rss_plain,
            "rss_adapters_loaded_bytes": rss_adapters,
            "rss_slots_filled_bytes": rss_loaded,
        },
    }


def adapter_mix(s: AdapterMixSettings) -> dict[str, Any]:
    """Run the measurement on a throw-away copy of the repository; write and return the result."""
    from publish.adapters import served_bank_layout

    if not servers.stack_built(s.model_repository, servers.GENERATE_STACK):
        raise RuntimeError(f"generate is not built in {s.model_repository}: run `make models`")
    served_bank_layout(s.model_repository)  # AdapterRefused, saying how to export the branch, if none
    load = background_load()
    with tempfile.TemporaryDirectory(prefix="fluxserve-adapter-mix-") as tmp:
        repo = Path(tmp) / "repo"
        for name in servers.GENERATE_STACK:  # hard links: versions are only ever added, never modified
            shutil.copytree(
                s.model_repository / name,
                repo / name,
                copy_function=os.link,
                ignore=shutil.ignore_patterns(".staging-*", "__pycache__"),
            )
        measured = _measure(s, repo, Path(tmp))
        assert adapters_dir(repo).is_relative_to(Path(tmp))  # the bench's adapters go with the copy
    result = {
        "kind": "adapter_mix",
        "started_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "environment": environment({}),
        "background_load_at_start": load,
        "background_load_at_end": background_load(),
        **measured,
    }
    write_json(result, s.out)
    s.out.with_suffix(".md").write_text(render_markdown(result))
    return result


def render_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    points = result["points"]
    base = {p["clients"]: p["images_per_s"] for p in points if p["distinct_adapters"] == 0}
    lines = [
        f"#### Per-request adapters through Triton ({result['started_utc']})",
        "",
        f"`generate` over gRPC, {s['image_side']}×{s['image_side']} px, {s['steps']} steps, "
        f"{s['requests_per_client']} requests per closed-loop client and pass ({s['repeats']} passes, pooled), each "
        f"naming the next of the distinct adapters (rank {s['rank']} LoRAs; 0 = none, the same run without "
        f"adapters; more distinct adapters than bank slots churn the slots). "
        f"CPU busy with other work at start / end: {result['background_load_at_start']['cpu_busy_fraction']} / "
        f"{result['background_load_at_end']['cpu_busy_fraction']}.",
        "",
        "| clients | distinct adapters | images/s | × no adapters | median latency s | transformer inferences per execution |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        ratio = p["images_per_s"] / base[p["clients"]] if base.get(p["clients"]) else None
        lines.append(
            f"| {p['clients']} | {p['distinct_adapters']} | {p['images_per_s']} | "
            f"{f'{ratio:.2f}×' if ratio else '–'} | {p['latency_median_s']} | {p['inferences_per_execution']} |"
        )
    t = result["time_to_serve"]
    m = result["memory"]
    mib = 1 << 20
    loading = [(b - a) / mib for a, b in zip(m["rss_no_adapter_bytes"], m.get("rss_adapters_loaded_bytes", []))]
    growth = [(b - a) / mib for a, b in zip(m["rss_no_adapter_bytes"], m["rss_slots_filled_bytes"])]
    full_bank = m["adapter_slots"] * m["slot_bytes"] / mib
    lines += [
        "",
        f"Time to serve: publish_adapter (convert + write the store) {t['publish_s']} s, then the first image "
        f"naming it {t['first_image_s']} s (the same warm: {t['warm_image_s']} s, no adapter: "
        f"{t['no_adapter_image_s']} s): publish to first image {t['publish_to_first_image_s']} s, of which "
        f"loading the adapter on first use about {t['first_use_over_warm_s']} s. No model load, no new version.",
        "",
        f"Memory: a bank slot holds {m['slot_bytes'] / mib:.2f} MiB (rank {m['rank']}, {m['layout']}), "
        f"{m['adapter_slots']} adapter slots per instance (slot 0 is none): {full_bank:.1f} MiB when all are "
        f"filled. Each of the {m['transformer_instances']} transformer instances grew, from a warm-up without "
        f"adapters at every client count, by {', '.join(f'{g:.1f}' for g in loading) or '–'} MiB once "
        f"every adapter had been loaded once, and by "
        f"{', '.join(f'{g:.1f}' for g in growth)} MiB after all the runs.",
        "",
    ]
    return "\n".join(lines)
