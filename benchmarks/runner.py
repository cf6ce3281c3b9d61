"""`fluxserve-bench run`: drive every requested target, then write JSON, markdown and plots.

Phases run one after another so no two measured things compete for the 2 cores: Triton + facade
(their targets), then the baseline (its targets), then the in-process ORT limit. Each target gets
a warm-up that is not recorded, then its load points in ascending order, each bracketed by
scrapes of Triton's metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import servers
from benchmarks.cpu import CpuMeter, cpu_delta
from benchmarks.environment import background_load, environment, model_facts, wait_until_idle
from benchmarks.flux_baseline import flux_available
from benchmarks.inprocess import LAYOUTS
from benchmarks.load import LoadStats, closed_loop, open_loop
from benchmarks.metrics_scrape import model_deltas, scrape
from benchmarks.plots import RawRuns, latency_plot, throughput_plot
from benchmarks.report import Result, add_ratios, headline, render_markdown, write_json
from benchmarks.targets import ALL_TARGETS, BASELINE, FACADE, ORT_INPROCESS, TargetName, make_target
from benchmarks.workload import GenerateWorkload, chat_texts
from common.paths import CLASSIFIER_MODEL_DIR, PROJECT_ROOT
from contract.specs import CLASSIFIER_ONNX as CLASSIFIER_ONNX_SPEC
from contract.specs import CLASSIFY, GENERATE, RESCUE_ENCODER_PARAMETER, RESCUE_MARGIN_PARAMETER
from export.triton_config import parse_config
from publish.repository import versions as repo_versions

log = logging.getLogger(__name__)

RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"
CLASSIFIER_DIR = CLASSIFIER_MODEL_DIR


@dataclass(frozen=True)
class LoadPoint:
    mode: str  # "closed" | "open"
    value: float  # concurrency (closed) or offered rate in req/s (open)


@dataclass
class RunSettings:
    out_dir: Path = RESULTS_DIR
    targets: tuple[str, ...] = ALL_TARGETS
    smoke: bool = False
    concurrency: tuple[int, ...] = (1, 8, 32)
    duration_s: float = 10.0
    """Closed loop: seconds per concurrency point (or `max_requests`, whichever comes first)."""
    max_requests: int = 100_000
    rate_rps: float | None = 50.0
    """Open loop offered rate for classify (None: no open-loop point)."""
    open_duration_s: float = 10.0
    warmup_s: float = 2.0
    warmup_requests: int = 2_000
    generate_concurrency: tuple[int, ...] = (1, 4)
    generate_duration_s: float = 60.0
    generate_max_requests: int = 40
    generate_rate_rps: float | None = None
    generate_warmup_requests: int = 2
    generate: GenerateWorkload = field(default_factory=GenerateWorkload)
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
    ort_layouts: tuple[tuple[int, int], ...] = LAYOUTS
    """(sessions, intra-op threads each) tried for the in-process limit (benchmarks/inprocess.py)."""
    ort_duration_s: float = 3.0
    model_repository: Path = servers.MODEL_REPOSITORY
    classifier_dir: Path = CLASSIFIER_DIR
    classifier_onnx: Path | None = None
    """Graph for the in-process ORT limit; None: the one `classifier_onnx` serves from model_repository
    (fp32 or int8, whichever the export chose), so the limit is that of the served artifact."""
    log_dir: Path = servers.LOG_DIR
    plots: bool = True
    wait_idle_s: float = 0.0
    """Before starting, wait up to this long for other work on the machine to finish."""


def smoke_settings(base: RunSettings) -> RunSettings:
    """A few seconds of load per target: 2 clients, 20 requests, tiny generate requests."""
    return replace(
        base,
        smoke=True,
        concurrency=(2,),
        duration_s=60.0,
        max_requests=20,
        rate_rps=20.0,
        open_duration_s=60.0,
        warmup_s=10.0,
        warmup_requests=4,
        generate_concurrency=(2,),
        generate_max_requests=4,
        generate_duration_s=300.0,
        generate_warmup_requests=1,
        generate=GenerateWorkload(64, 64, 2, 3.5),
        batch_sizes=(1, 8),
        ort_duration_s=0.3,
    )


def _plan(model: str, s: RunSettings) -> list[LoadPoint]:
    if model == CLASSIFY.name:
        points = [LoadPoint("closed", c) for c in sorted(s.concurrency)]
        return points + ([LoadPoint("open", s.rate_rps)] if s.rate_rps else [])
    points = [LoadPoint("closed", c) for c in sorted(s.generate_concurrency)]
    return points + ([LoadPoint("open", s.generate_rate_rps)] if s.generate_rate_rps else [])


Measured = list[tuple[LoadPoint, LoadStats, dict[str, Any] | None, dict[str, object]]]


async def _measure_target(
    name: TargetName,
    url: str,
    s: RunSettings,
    metrics_url: str | None,
    triton_models: Sequence[str],
    texts: list[str],
    meter: CpuMeter,
) -> Measured:
    plan = _plan(name.model, s)
    is_generate = name.model == GENERATE.name
    max_conc = max(int(p.value) for p in plan if p.mode == "closed") if any(p.mode == "closed" for p in plan) else 8
    target = make_target(name, url, texts, s.generate, pool=max(max_conc, 64))
    out = []
    try:
        warm_n = s.generate_warmup_requests if is_generate else s.warmup_requests
        warm = await closed_loop(target, max_conc, s.warmup_s if not is_generate else s.generate_duration_s, warm_n)
        log.info("%s: warm-up %d requests, %d errors %s", name, warm.sent, warm.errors, warm.error_samples[:1])
        for point in plan:
            before = scrape(metrics_url) if metrics_url else None
            cpu_before = meter.snapshot()
            if point.mode == "closed":
                duration, max_n = (
                    (s.generate_duration_s, s.generate_max_requests) if is_generate else (s.duration_s, s.max_requests)
                )
                stats = await closed_loop(target, int(point.value), duration, max_n)
            else:
                duration, max_n = (
                    (s.generate_duration_s, s.generate_max_requests)
                    if is_generate
                    else (s.open_duration_s, s.max_requests)
                )
                stats = await open_loop(target, point.value, duration, max_n)
            cpu = cpu_delta(cpu_before, meter.snapshot(), stats.wall_s, stats.ok)
            deltas = (
                model_deltas(before, scrape(metrics_url), triton_models) if metrics_url and before is not None else None
            )
            log.info(
                "%s %s %g: %.1f req/s, p50 %.1f ms, p99 %.1f ms, %d errors",
                name,
                point.mode,
                point.value,
                stats.throughput_rps,
                stats.percentile_ms(50),
                stats.percentile_ms(99),
                stats.errors,
            )
            out.append((point, stats, deltas, cpu))
    finally:
        await target.aclose()
    return out


def served_classifier_graph(repo: Path) -> Path:
    vs = repo_versions(repo, CLASSIFIER_ONNX_SPEC.name)
    return repo / CLASSIFIER_ONNX_SPEC.name / str(vs[-1] if vs else 0) / "model.onnx"


def served_rescue(repo: Path) -> tuple[Path, float] | None:
    """The fp32 graph and margin `classify` rescues int8's near-boundary rows with, if its config has one."""
    config, vs = repo / CLASSIFY.name / "config.pbtxt", repo_versions(repo, CLASSIFY.name)
    if not config.exists() or not vs:
        return None
    params = {k: v.string_value for k, v in parse_config(config.read_text()).parameters.items()}
    graph = params.get(RESCUE_ENCODER_PARAMETER)
    if not graph:
        return None
    return repo / CLASSIFY.name / str(vs[-1]) / graph, float(params.get(RESCUE_MARGIN_PARAMETER, "0"))


def _select_targets(s: RunSettings) -> tuple[list[TargetName], bool, dict[str, str]]:
    """Targets that can run here, whether the ORT limit is wanted, and why the others are skipped."""
    skipped: dict[str, str] = {}
    names: list[TargetName] = []
    classify_built = servers.stack_built(s.model_repository, servers.CLASSIFY_STACK)
    generate_built = servers.stack_built(s.model_repository, servers.GENERATE_STACK)
    flux_reason = flux_available() if any(t == f"{BASELINE}-{GENERATE.name}" for t in s.targets) else None
    for t in s.targets:
        if t == ORT_INPROCESS:
            continue
        name = TargetName.parse(t)
        if name.model == CLASSIFY.name and name.door != BASELINE and not classify_built:
            skipped[t] = "classify is not built (run `make models`)"
        elif name.model == CLASSIFY.name and name.door == BASELINE and not s.classifier_dir.is_dir():
            skipped[t] = f"no classifier checkpoint at {s.classifier_dir}"
        elif name.model == GENERATE.name and name.door != BASELINE and not generate_built:
            skipped[t] = "generate is not built in the model repository"
        elif name.model == GENERATE.name and name.door == BASELINE and not generate_built:
            skipped[t] = "generate is not built in the model repository: nothing to compare with"
        elif name.model == GENERATE.name and name.door == BASELINE and flux_reason:
            skipped[t] = flux_reason
        else:
            names.append(name)
    want_ort = ORT_INPROCESS in s.targets
    if want_ort and (s.classifier_onnx is None or not s.classifier_onnx.exists()):
        skipped[ORT_INPROCESS] = f"no classifier ONNX at {s.classifier_onnx}"
        want_ort = False
    for t, why in skipped.items():
        log.warning("skipping %s: %s", t, why)
    return names, want_ort, skipped


def _record(
    result: Result, raw: dict[tuple[str, str, float], LoadStats], name: TargetName, url: str, measured: Measured
) -> None:
    runs = []
    for point, stats, deltas, cpu in measured:
        run = stats.summary()
        if deltas is not None:
            run["triton"] = deltas
        run["cpu"] = cpu
        runs.append(run)
        raw[(str(name), point.mode, float(point.value))] = stats
    result["targets"][str(name)] = {"door": name.door, "model": name.model, "url": url, "runs": runs}


def _triton_version(server: Any) -> str | None:
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(server.http_url)
    try:
        return client.get_server_metadata().get("version")
    except Exception:  # informative only
        return None
    finally:
        client.close()


BUSY_WARNING = 0.2


def run(s: RunSettings) -> Result:
    if s.classifier_onnx is None:
        s = replace(s, classifier_onnx=served_classifier_graph(s.model_repository))
    if s.wait_idle_s > 0:
        wait_until_idle(s.wait_idle_s)
    started = time.monotonic()
    background = background_load()
    if (background["cpu_busy_fraction"] or 0) > BUSY_WARNING:
        log.warning(
            "the machine is already %.0f%% busy before the run: figures will be skewed",
            100 * background["cpu_busy_fraction"],
        )
    names, want_ort, skipped = _select_targets(s)
    texts = chat_texts()
    gen_models = servers.GENERATE_STACK
    result: Result = {
        "schema_version": 1,
        "kind": "run",
        "started_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": s.smoke,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "environment": environment(model_facts(s.classifier_dir, s.classifier_onnx, s.model_repository, gen_models)),
        "background_before_run": background,
        "workload": {"classify_texts": len(texts), "generate": asdict(s.generate)},
        "targets": {},
        "ort_inprocess": None,
        "flux_inprocess": None,
        "skipped": skipped,
    }
    raw: dict[tuple[str, str, float], LoadStats] = {}
    served = [n for n in names if n.door != BASELINE]
    served.sort(key=lambda n: (n.model, n.door != FACADE))
    if served:
        models: list[str] = []
        if any(n.model == CLASSIFY.name for n in served):
            models += servers.CLASSIFY_STACK
        if any(n.model == GENERATE.name for n in served):
            models += gen_models
        with ExitStack() as stack:
            triton = stack.enter_context(servers.triton(s.model_repository, models, s.log_dir))
            meter = CpuMeter({"triton": triton.process.pid})
            result["environment"]["triton_version"] = _triton_version(triton)
            required = [m for m in (CLASSIFY.name, GENERATE.name) if m in models]
            facade = (
                stack.enter_context(
                    servers.facade(triton.grpc_url, required, s.log_dir, extra_env=servers.CAPACITY_ENV)
                )
                if any(n.door == FACADE for n in served)
                else None
            )
            if facade is not None:
                meter.add("facade", facade.proc.pid)
            for name in served:
                url = facade.url if name.door == FACADE and facade else triton.grpc_url
                split = servers.CLASSIFY_STACK if name.model == CLASSIFY.name else gen_models
                measured = asyncio.run(_measure_target(name, url, s, triton.metrics_url, split, texts, meter))
                _record(result, raw, name, url, measured)
    base_names = [n for n in names if n.door == BASELINE]
    if base_names:
        with_generate = any(n.model == GENERATE.name for n in base_names)
        with servers.baseline(s.classifier_dir, with_generate, s.log_dir) as base:
            import httpx

            result["environment"]["baseline"] = httpx.get(base.url + "/readyz", timeout=5).json()
            for name in base_names:
                meter = CpuMeter({"baseline": base.proc.pid})
                measured = asyncio.run(_measure_target(name, base.url, s, None, (), texts, meter))
                _record(result, raw, name, base.url, measured)
    if want_ort:
        from benchmarks.inprocess import ort_sweep

        result["ort_inprocess"] = ort_sweep(
            s.classifier_onnx,
            s.classifier_dir,
            texts,
            s.batch_sizes,
            s.ort_layouts,
            s.ort_duration_s,
            rescue=served_rescue(s.model_repository),
        )
    if any(n.model == GENERATE.name for n in names):
        from benchmarks.flux_inprocess import flux_inprocess

        # The limit for /generate: the same ONNX files and loop in this process, no server.
        result["flux_inprocess"] = flux_inprocess(
            s.model_repository,
            s.generate,
            tuple(sorted({1, *s.generate_concurrency})),
            requests=4 if s.smoke else 16,
        )
    result["background_after_run"] = background_load()
    add_ratios(result)
    result["headline"] = {}
    for model, conc in ((CLASSIFY.name, s.concurrency), (GENERATE.name, s.generate_concurrency)):
        if any(t["model"] == model for t in result["targets"].values()):
            head_conc = (
                32
                if model == CLASSIFY.name and 32 in conc
                else 4
                if 4 in conc and model == GENERATE.name
                else max(conc)
            )
            result["headline"][model] = headline(result, model, head_conc)
    gen_head, limit = result["headline"].get(GENERATE.name), result.get("flux_inprocess")
    if gen_head and limit:
        facade_rps = (gen_head["targets"].get(f"{FACADE}-{GENERATE.name}") or {}).get("throughput_rps")
        gen_head["facade_of_inprocess"] = round(facade_rps / limit["best_images_per_s"], 3) if facade_rps else None
    result["files"] = write_outputs(result, raw, s, started)
    return result


def write_outputs(result: Result, raw: RawRuns, s: RunSettings, started: float) -> dict[str, Any]:
    s.out_dir.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    if s.plots:
        ort_limit = (result.get("ort_inprocess") or {}).get("best_texts_per_s")
        for model, conc, rate in (
            (CLASSIFY.name, s.concurrency, s.rate_rps),
            (GENERATE.name, s.generate_concurrency, s.generate_rate_rps),
        ):
            head = (result.get("headline") or {}).get(model)
            if not head:
                continue
            for path in (
                latency_plot(raw, model, head["concurrency"], rate, s.out_dir / f"latency_{model}.png"),
                throughput_plot(
                    raw, model, s.out_dir / f"throughput_{model}.png", ort_limit if model == CLASSIFY.name else None
                ),
            ):
                if path is not None:
                    plots.append(str(path))
    files = {"json": str(s.out_dir / "latest.json"), "markdown": str(s.out_dir / "latest.md"), "plots": plots}
    result["files"] = files
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    (s.out_dir / "latest.md").write_text(render_markdown(result))
    write_json(result, s.out_dir / "latest.json")
    return files
