"""`fluxserve-bench`: load benchmarks of fluxserve against its baseline, and a batching sweep.

fluxserve-bench run [--smoke] [--duration-s 10] [--concurrency 1 8 32] [--rate 50]
                    [--targets facade-classify triton-classify baseline-classify ort-inprocess ...]
                    [--out benchmarks/results]
fluxserve-bench precision [--concurrency 32] [--duration-s 10]  # fp32 vs int8 classifier, both doors
fluxserve-bench sweep [--concurrency 32] [--duration-s 8] [--candidates 0 2000 5000:16,32]
fluxserve-bench swap [--concurrency 2] [--train-steps 40]  # training job + hot swap under /generate load
fluxserve-bench overload [--duration-s 30] [--multipliers 2 5 10]  # shedding beyond capacity
fluxserve-bench goodput [--duration-s 10] [--endpoints ...]          # closed loop, immediate retries
fluxserve-bench wrk [--connections 32] [--duration-s 15]   # /classify facade vs baseline, driven by wrk
fluxserve-bench recovery [--repeats 2]                  # kill -9 of Triton, a stub, the worker: time to ready
fluxserve-bench gpu [--dry-run] [--configs bf16 bf16-compile fp8-compile]  # the gpu-torch path, 1024², 28 steps
fluxserve-bench adapters [--rank 16] [--repeats 15] [--no-int8]  # per-request LoRA branch: step cost, memory
fluxserve-bench adapter-mix [--clients 4 8] [--distinct 0 1 4 8]  # adapters mixed through Triton: images/s, time to serve
fluxserve-bench report benchmarks/results/latest.json     # print the markdown table again
fluxserve-bench docs                                       # put the latest tables into docs/benchmarks.md (alias: readme)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from benchmarks.targets import ALL_TARGETS
from benchmarks.workload import GenerateWorkload


def _run(args: argparse.Namespace) -> int:
    from benchmarks.runner import RunSettings, run, smoke_settings

    s = RunSettings(
        out_dir=args.out,
        targets=tuple(args.targets),
        log_dir=args.log_dir,
        plots=not args.no_plots,
        wait_idle_s=args.wait_idle_s,
    )
    if args.model_repository:
        s = replace(s, model_repository=args.model_repository)
    if args.smoke:
        s = smoke_settings(s)
    overrides = {
        "duration_s": args.duration_s,
        "open_duration_s": args.duration_s if args.duration_s else None,
        "concurrency": tuple(args.concurrency) if args.concurrency else None,
        "rate_rps": (args.rate or None) if args.rate is not None else None,
        "max_requests": args.max_requests,
        "batch_sizes": tuple(args.batch_sizes) if args.batch_sizes else None,
        "generate_concurrency": tuple(args.generate_concurrency) if args.generate_concurrency else None,
        "generate_max_requests": args.generate_max_requests,
    }
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    if args.rate == 0:
        s = replace(s, rate_rps=None)
    if args.generate_size or args.generate_steps:
        g = s.generate
        side = args.generate_size or g.width
        s = replace(s, generate=GenerateWorkload(side, side, args.generate_steps or g.steps, g.guidance))
    started = time.monotonic()
    result = run(s)
    logging.getLogger("fluxserve.bench").info("done in %.0f s: %s", time.monotonic() - started, result["files"])
    sys.stdout.write(Path(result["files"]["markdown"]).read_text())
    return 0


def _precision(args: argparse.Namespace) -> int:
    from benchmarks.precision import PrecisionBenchSettings, bench_precision, render_markdown

    s = PrecisionBenchSettings(concurrency=tuple(args.concurrency), duration_s=args.duration_s)
    sys.stdout.write(render_markdown(bench_precision(s)))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from benchmarks.sweep import Candidate, Layout, SweepSettings, sweep

    s = SweepSettings(
        concurrency=args.concurrency,
        duration_s=args.duration_s,
        repeats=args.repeats,
        tie_tolerance=args.tie_tolerance,
        out=args.out,
        log_dir=args.log_dir,
    )
    if args.candidates:
        s = replace(s, candidates=tuple(Candidate.parse(c) for c in args.candidates))
    if args.layouts is not None:
        s = replace(s, layouts=tuple(Layout.parse(x) for x in args.layouts))
    if args.model_repository:
        s = replace(s, model_repository=args.model_repository)
    rec = sweep(s)
    keys = ("classify", "classifier_onnx", "measured", "measured_layouts")
    sys.stdout.write(json.dumps({k: rec[k] for k in keys}, indent=2) + "\n")
    return 0


def _swap(args: argparse.Namespace) -> int:
    from benchmarks.swap import SwapSettings, render_markdown, swap

    s = SwapSettings(
        concurrency=args.concurrency,
        train_steps=args.train_steps,
        out=args.out,
        log_dir=args.log_dir,
        compare_full_export=args.compare_full_export,
    )
    if args.model_repository:
        s = replace(s, model_repository=args.model_repository)
    sys.stdout.write(render_markdown(swap(s)))
    return 0


def _overload(args: argparse.Namespace) -> int:
    from benchmarks.overload import OverloadSettings, overload, render_markdown

    s = OverloadSettings(
        duration_s=args.duration_s,
        multipliers=tuple(args.multipliers),
        endpoints=tuple(args.endpoints),
        connections=args.connections,
        facade_env=dict(kv.split("=", 1) for kv in args.facade_env),
        out=args.out,
        log_dir=args.log_dir,
    )
    if args.model_repository:
        s = replace(s, model_repository=args.model_repository)
    sys.stdout.write(render_markdown(overload(s)))
    return 0


def _goodput(args: argparse.Namespace) -> int:
    from benchmarks.goodput import GoodputSettings, goodput, render_markdown

    s = GoodputSettings(
        duration_s=args.duration_s,
        endpoints=tuple(args.endpoints),
        drivers=tuple(args.drivers),
        facade_env=dict(kv.split("=", 1) for kv in args.facade_env),
        out=args.out,
        log_dir=args.log_dir,
    )
    if args.model_repository:
        s = replace(s, model_repository=args.model_repository)
    sys.stdout.write(render_markdown(goodput(s)))
    return 0


def _recovery(args: argparse.Namespace) -> int:
    from benchmarks.recovery import RecoverySettings, recovery, render_markdown

    sys.stdout.write(render_markdown(recovery(RecoverySettings(repeats=args.repeats, out=args.out))))
    return 0


def _wrk(args: argparse.Namespace) -> int:
    from benchmarks.wrk_check import WrkSettings, render_markdown, wrk_check

    s = WrkSettings(connections=args.connections, duration_s=args.duration_s, out=args.out)
    sys.stdout.write(render_markdown(wrk_check(s)))
    return 0


def _gpu(args: argparse.Namespace) -> int:
    from benchmarks.gpu import run_from_args

    return run_from_args(args)


def _adapters(args: argparse.Namespace) -> int:
    from benchmarks.adapters import AdapterBenchSettings, bench_adapters, render_markdown

    given = {
        "checkpoint": args.checkpoint,
        "rank": args.rank,
        "slots": args.slots,
        "layouts": tuple(args.layouts) if args.layouts else None,
        "batch": args.batch,
        "image_side": args.image_side,
        "repeats": args.repeats,
        "threads": args.threads,
        "out": args.out,
    }
    s = AdapterBenchSettings(
        int8=args.int8, reuse_exports=args.reuse_exports, **{k: v for k, v in given.items() if v is not None}
    )
    sys.stdout.write(render_markdown(bench_adapters(s)))
    return 0


def _adapter_ready(args: argparse.Namespace) -> int:
    from benchmarks.adapter_ready import AdapterReadySettings, adapter_ready, render_markdown

    s = AdapterReadySettings(train_steps=args.train_steps, out=args.out, log_dir=args.log_dir)
    if args.model_repository:
        s = replace(s, model_repository=args.model_repository)
    sys.stdout.write(render_markdown(adapter_ready(s)))
    return 0


def _adapter_mix(args: argparse.Namespace) -> int:
    from benchmarks.adapter_mix import AdapterMixSettings, adapter_mix, render_markdown

    given = {
        "clients": tuple(args.clients) if args.clients else None,
        "distinct": tuple(args.distinct) if args.distinct else None,
        "requests_per_client": args.requests_per_client,
        "image_side": args.image_side,
        "steps": args.steps,
        "model_repository": args.model_repository,
        "out": args.out,
    }
    s = AdapterMixSettings(log_dir=args.log_dir, **{k: v for k, v in given.items() if v is not None})
    sys.stdout.write(render_markdown(adapter_mix(s)))
    return 0


def _docs(_args: argparse.Namespace) -> int:
    from benchmarks.docs_page import PAGE, update_page

    logging.getLogger("fluxserve.bench").info("%s sections updated: %s", PAGE.name, update_page() or "none")
    return 0


def _report(args: argparse.Namespace) -> int:
    from benchmarks.report import render_markdown

    sys.stdout.write(render_markdown(json.loads(args.result.read_text())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.runner import RESULTS_DIR
    from benchmarks.servers import LOG_DIR
    from common.paths import RECOMMENDED_BATCHING_FILE

    parser = argparse.ArgumentParser(prog="fluxserve-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="benchmark facade, Triton and baseline; write JSON, markdown, plots")
    r.add_argument("--smoke", action="store_true", help="a few seconds: 2 clients, 20 requests per target")
    r.add_argument("--duration-s", type=float, help="seconds per load point (default 10)")
    r.add_argument("--concurrency", type=int, nargs="+", help="closed-loop clients for classify (default 1 8 32)")
    r.add_argument("--rate", type=float, help="open-loop req/s for classify (default 50; 0 disables)")
    r.add_argument("--max-requests", type=int, help="cap on requests per load point")
    r.add_argument("--targets", nargs="+", choices=ALL_TARGETS, default=list(ALL_TARGETS))
    r.add_argument("--batch-sizes", type=int, nargs="+", help="ORT in-process sweep (default 1 4 8 16 32 64)")
    r.add_argument("--generate-concurrency", type=int, nargs="+", help="closed-loop clients for generate (default 1 4)")
    r.add_argument("--generate-max-requests", type=int, help="requests per generate load point (default 40)")
    r.add_argument("--generate-size", type=int, help="generate image side in pixels (default 256)")
    r.add_argument("--generate-steps", type=int, help="generate denoising steps (default 4)")
    r.add_argument("--model-repository", type=Path)
    r.add_argument("--out", type=Path, default=RESULTS_DIR)
    r.add_argument("--log-dir", type=Path, default=LOG_DIR, help="server logs")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument(
        "--wait-idle-s",
        type=float,
        default=0.0,
        help="first wait up to this long for other work on the machine to finish",
    )
    r.set_defaults(fn=_run)

    pr = sub.add_parser(
        "precision", help="fp32 vs int8 classifier: facade, Triton gRPC, baseline, in-process ORT limit"
    )
    pr.add_argument("--concurrency", type=int, nargs="+", default=[32])
    pr.add_argument("--duration-s", type=float, default=10.0)
    pr.set_defaults(fn=_precision)

    w = sub.add_parser(
        "sweep", help="measure classify batching, then instance and ORT thread layouts; write the recommendation"
    )
    w.add_argument("--concurrency", type=int, default=32)
    w.add_argument("--duration-s", type=float, default=8.0)
    w.add_argument("--repeats", type=int, default=1)
    w.add_argument("--tie-tolerance", type=float, default=0.03)
    w.add_argument("--candidates", nargs="+", help='"DELAY_US" or "DELAY_US:B1,B2" (default: 6 built-in)')
    w.add_argument(
        "--layouts",
        nargs="*",
        help='"CLASSIFY_INSTANCES,ONNX_INSTANCES,ONNX_THREADS" at the chosen batching (default: 6 built-in; none: skip)',
    )
    w.add_argument("--model-repository", type=Path)
    w.add_argument("--out", type=Path, default=RECOMMENDED_BATCHING_FILE)
    w.add_argument("--log-dir", type=Path, default=LOG_DIR)
    w.set_defaults(fn=_sweep)

    from benchmarks.swap import RESULT_FILE as SWAP_RESULT

    sw = sub.add_parser("swap", help="a LoRA training job and its hot swap under /generate load")
    sw.add_argument("--concurrency", type=int, default=2, help="closed-loop /generate clients")
    sw.add_argument("--train-steps", type=int, default=40)
    sw.add_argument("--model-repository", type=Path)
    sw.add_argument("--out", type=Path, default=SWAP_RESULT)
    sw.add_argument("--log-dir", type=Path, default=LOG_DIR)
    sw.add_argument(
        "--no-full-export",
        dest="compare_full_export",
        action="store_false",
        help="skip the idle job published by a full fuse + re-export (weight patching off)",
    )
    sw.set_defaults(fn=_swap)

    from benchmarks.overload import RESULT_FILE as OVERLOAD_RESULT
    from benchmarks.overload import OverloadSettings

    ov = sub.add_parser("overload", help="open-loop load at multiples of capacity: shedding, latency, abandoned work")
    ov.add_argument("--duration-s", type=float, default=30.0, help="seconds per load point")
    ov.add_argument("--multipliers", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    ov.add_argument("--endpoints", nargs="+", choices=["generate", "classify"], default=["generate", "classify"])
    ov.add_argument(
        "--connections",
        type=int,
        default=OverloadSettings().connections,
        help="the load generator's keep-alive connections (independent clients)",
    )
    ov.add_argument("--facade-env", nargs="*", default=[], metavar="NAME=VALUE", help="an experiment's facade settings")
    ov.add_argument("--model-repository", type=Path)
    ov.add_argument("--out", type=Path, default=OVERLOAD_RESULT)
    ov.add_argument("--log-dir", type=Path, default=LOG_DIR)
    ov.set_defaults(fn=_overload)

    from benchmarks.goodput import RESULT_FILE as GOODPUT_RESULT

    gp = sub.add_parser(
        "goodput", help="closed loop, immediate retries: answered-200 rate at 1x-64x the saturating concurrency"
    )
    gp.add_argument("--duration-s", type=float, default=10.0, help="seconds per load point and driver")
    gp.add_argument("--endpoints", nargs="+", choices=["classify", "generate"], default=["classify", "generate"])
    gp.add_argument("--drivers", nargs="+", choices=["wrk", "python"], default=["wrk", "python"])
    gp.add_argument("--facade-env", nargs="*", default=[], metavar="NAME=VALUE", help="an experiment's facade settings")
    gp.add_argument("--model-repository", type=Path)
    gp.add_argument("--out", type=Path, default=GOODPUT_RESULT)
    gp.add_argument("--log-dir", type=Path, default=LOG_DIR)
    gp.set_defaults(fn=_goodput)

    from benchmarks.recovery import RESULT_FILE as RECOVERY_RESULT

    rc = sub.add_parser("recovery", help="make up's stack: time to ready again after kill -9 of its parts")
    rc.add_argument("--repeats", type=int, default=2, help="kills of tritonserver")
    rc.add_argument("--out", type=Path, default=RECOVERY_RESULT)
    rc.set_defaults(fn=_recovery)

    from benchmarks.wrk_check import RESULT_FILE as WRK_RESULT

    wk = sub.add_parser("wrk", help="/classify through the facade vs the baseline, driven by wrk (outside check)")
    wk.add_argument("--connections", type=int, default=32)
    wk.add_argument("--duration-s", type=int, default=15)
    wk.add_argument("--out", type=Path, default=WRK_RESULT)
    wk.set_defaults(fn=_wrk)

    from benchmarks.gpu import add_arguments as gpu_arguments

    gp = sub.add_parser("gpu", help="gpu-torch: build FLUX.1-dev-sized, serve it, measure Triton vs in-process")
    gpu_arguments(gp)
    gp.set_defaults(fn=_gpu)

    # `readme` was its name while the tables lived in README.md; scripts that call it keep working.
    # Defaults live in benchmarks.adapters.AdapterBenchSettings (not imported here: it pulls in torch and onnx).
    ad = sub.add_parser("adapters", help="per-request LoRA branch: transformer step cost vs the plain graph, memory")
    ad.add_argument("--checkpoint", type=Path, help="FLUX folder (default: the local build)")
    ad.add_argument("--rank", type=int, help="the bank's max rank R (default 16)")
    ad.add_argument("--slots", type=int, help="bank slots, slot 0 included (default 8)")
    ad.add_argument("--layouts", nargs="+", help="bank layouts: per_layer grouped (default both)")
    ad.add_argument("--batch", type=int, help="rows per step (default 4; distinct adapters cycle over 4)")
    ad.add_argument("--image-side", type=int, help="pixels (default 256)")
    ad.add_argument("--repeats", type=int, help="interleaved timed steps per variant (default 15)")
    ad.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default 1)")
    ad.add_argument("--no-int8", dest="int8", action="store_false", help="fp32 graphs only")
    ad.add_argument("--reuse-exports", action="store_true", help="reuse an earlier run's exports (same sources)")
    ad.add_argument("--out", type=Path, help="results folder (default build/bench/adapters)")
    ad.set_defaults(fn=_adapters)

    from benchmarks.adapter_ready import RESULT_FILE as ADAPTER_READY_RESULT

    ar = sub.add_parser("adapter-ready", help="an adapter job's `succeeded` to the first image naming it")
    ar.add_argument("--train-steps", type=int, default=20)
    ar.add_argument("--model-repository", type=Path, help="a repository whose transformer has the adapter branch")
    ar.add_argument("--out", type=Path, default=ADAPTER_READY_RESULT)
    ar.add_argument("--log-dir", type=Path, default=LOG_DIR)
    ar.set_defaults(fn=_adapter_ready)

    # Defaults live in benchmarks.adapter_mix.AdapterMixSettings.
    am = sub.add_parser(
        "adapter-mix", help="adapters mixed per request through Triton: images/s, time to serve, memory"
    )
    am.add_argument("--clients", type=int, nargs="+", help="closed-loop clients per point (default 4 8)")
    am.add_argument("--distinct", type=int, nargs="+", help="distinct adapters per point, 0 = none (default 0 1 4 8)")
    am.add_argument("--requests-per-client", type=int, help="requests each client sends per point (default 4)")
    am.add_argument("--image-side", type=int, help="pixels (default 128)")
    am.add_argument("--steps", type=int, help="denoising steps (default 4)")
    am.add_argument("--model-repository", type=Path, help="a repository whose transformer has the adapter branch")
    am.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/adapter_mix.json)")
    am.add_argument("--log-dir", type=Path, default=LOG_DIR)
    am.set_defaults(fn=_adapter_mix)

    rd = sub.add_parser("docs", aliases=["readme"], help="put the latest measured tables into docs/benchmarks.md")
    rd.set_defaults(fn=_docs)

    p = sub.add_parser("report", help="print the markdown table of a result JSON")
    p.add_argument("result", type=Path)
    p.set_defaults(fn=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx (readiness probes, metric scrapes) logs every request at INFO.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # No hub access at run time, for this process and the servers it starts.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
