"""`fluxserve-bench swap`: a LoRA training job end to end under /generate load.

Serves a copy of the model repository (weights hard-linked) with the real Triton, facade and
training worker, keeps `concurrency` clients sending /generate, posts a training job on synthetic
solid-colour squares, and measures what a user of the training API sees: how fast the job id comes
back, training steps/s, publish (fuse + ONNX export + Triton load) time, time from POST until
responses carry the new model version, and every /generate response during the job and the swap
(failures, version order, latency).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from PIL import Image

from benchmarks import servers
from benchmarks.environment import environment
from benchmarks.report import write_json
from common.paths import PROJECT_ROOT
from contract.specs import GENERATE, GENERATE_STREAM
from export.flux.settings import FluxSettings
from training.worker import running_worker

log = logging.getLogger(__name__)

RESULT_FILE = PROJECT_ROOT / "benchmarks" / "results" / "swap.json"


@dataclass(frozen=True)
class SwapSettings:
    concurrency: int = 2
    """Closed-loop /generate clients running through the whole job and swap."""
    image_side: int = 64
    generate_steps: int = 2
    train_steps: int = 40
    learning_rate: float = 0.01
    resolution: int = 64
    images: int = 4
    trigger_word: str = "zxq"
    timeout_s: float = 900.0
    compare_full_export: bool = True
    """Also run one idle job with weight patching off: the full fuse + re-export, side by side."""
    model_repository: Path = servers.MODEL_REPOSITORY
    out: Path = RESULT_FILE
    log_dir: Path = servers.LOG_DIR


def solid_color_zip(
    n: int = 4, size: int = 64, color: tuple[int, int, int] = (220, 30, 30), caption: str | None = "a plain red square"
) -> bytes:
    """A training upload of `n` identical solid-colour squares (PNG), with captions when given."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            img = io.BytesIO()
            Image.new("RGB", (size, size), color).save(img, format="PNG")
            zf.writestr(f"img{i}.png", img.getvalue())
            if caption is not None:
                zf.writestr(f"img{i}.txt", caption)
    return buf.getvalue()


@dataclass
class Response:
    sent_s: float
    done_s: float
    status: int
    model_version: str | None


async def _generate_load(url: str, s: SwapSettings, t0: float, stop: asyncio.Event, out: list[Response]) -> None:
    """Closed-loop /generate clients until `stop`; every response is appended to `out` as it lands
    (the job watcher reads it live to see when the new version serves)."""
    body = {
        "prompt": "a red square",
        "width": s.image_side,
        "height": s.image_side,
        "steps": s.generate_steps,
        "seed": 1,
    }
    async with aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=600)) as http:

        async def client() -> None:
            while not stop.is_set():
                sent = time.monotonic() - t0
                try:
                    async with http.post("/generate", json=body) as r:
                        version = (await r.json()).get("model_version") if r.status == 200 else None
                        status = r.status
                except aiohttp.ClientError:
                    version, status = None, 0
                out.append(Response(sent, time.monotonic() - t0, status, version))

        await asyncio.gather(*(client() for _ in range(s.concurrency)))


def new_bytes(repo: Path, publish: dict[str, Any]) -> int:
    """Bytes of the job's new model versions that share no inode with the versions before them or
    with the base export a patch starts from: what the publish actually wrote (a hard-linked
    unchanged tensor costs nothing, also when the version before served another LoRA's copy of it;
    a file written once into the export folder and linked into the repository counts once)."""
    # generate_stream is published beside generate with the same version number.
    served = int(publish["model_version"])
    versions = {**publish.get("components", {}), GENERATE.name: served, GENERATE_STREAM.name: served}
    report = publish.get("report", {})
    total = 0
    for name in publish.get("created", []):
        folder = repo / name / str(versions[name])
        older = [p for p in (repo / name).iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) < versions[name]]
        entry = report.get(name)
        base = entry.get("base_onnx_dir") if isinstance(entry, dict) else None
        if base:
            # The job API shortens paths to their last part ("…/<fingerprint>"): find the base
            # export where the publisher keeps them (export.flux_build: <export_root>/<component>/).
            older.append(FluxSettings().export_root / name / Path(base).name)
        seen = {f.stat().st_ino for p in older if p.is_dir() for f in p.rglob("*") if f.is_file()}
        fresh = [
            (st.st_size, f.name, st.st_nlink)
            for f in folder.rglob("*")
            if f.is_file() and (st := f.stat()).st_ino not in seen
        ]
        written = sum(size for size, _, _ in fresh)
        total += written
        log.info(
            "%s %s: %d new files, %.1f MB (base %s; largest, with link counts: %s)",
            name,
            versions[name],
            len(fresh),
            written / 1e6,
            base,
            sorted(fresh)[-3:],
        )
    return total


async def _run_job(
    url: str, s: SwapSettings, t0: float, responses: list[Response] | None, seed: int, api_key: str
) -> dict[str, Any]:
    """Post a job and follow it to the end. With `responses` (a /generate load running), also wait
    until a response carries the new version; without, serving starts when the job ends (its
    publish step returns once Triton has loaded the new version)."""
    form = aiohttp.FormData()
    for k, v in {
        "trigger_word": s.trigger_word,
        "steps": s.train_steps,
        "learning_rate": s.learning_rate,
        "resolution": s.resolution,
        "seed": seed,
    }.items():
        form.add_field(k, str(v))
    form.add_field(
        "dataset", solid_color_zip(s.images, s.resolution), filename="data.zip", content_type="application/zip"
    )
    marks: dict[str, float] = {}
    auth = {"Authorization": f"Bearer {api_key}"}  # the training API needs the operator key
    async with aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=60), headers=auth) as http:
        posted = time.monotonic()
        async with http.post("/train", data=form) as r:
            accepted = await r.json()
            if r.status != 202:
                raise RuntimeError(f"POST /train answered {r.status}: {accepted}")
        marks["accepted"] = time.monotonic() - posted
        job_id = accepted["job_id"]
        deadline = posted + s.timeout_s
        while time.monotonic() < deadline:
            try:
                async with http.get(f"/train/{job_id}") as r:
                    job = await r.json()
            except TimeoutError:  # a slow poll (an export hogging the cores) is not a failed job
                continue
            now = time.monotonic() - posted
            if job["status"] == "running":
                marks.setdefault("running", now)
            if (job.get("result") or {}).get("publish", {}).get("status") == "running":
                marks.setdefault("publish_started", now)  # training done, fuse + export + load begins
            if job["status"] in ("succeeded", "failed", "cancelled"):
                marks["job_done"] = now
                break
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"job {job_id} did not finish in {s.timeout_s:.0f}s: {job}")
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
        new_version = job["result"]["publish"]["model_version"]
        if responses is None:
            marks["serving"] = marks["job_done"]
        else:
            while not any(r.model_version == new_version for r in responses[-s.concurrency :]):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {job_id} published version {new_version}, but /generate never served it")
                await asyncio.sleep(0.2)
            first = min(r.done_s for r in responses if r.model_version == new_version)
            marks["serving"] = first - (posted - t0)
    return {"job": job, "marks_s": marks, "posted_at_s": posted - t0, "new_version": new_version}


def _summarize(responses: list[Response], posted_at: float, publish_started: float, serving: float) -> dict[str, Any]:
    def window(a: float, b: float) -> list[Response]:
        return [r for r in responses if r.done_s >= a and r.sent_s <= b]

    during_job = window(posted_at, posted_at + serving)
    during_swap = window(posted_at + publish_started, posted_at + serving)
    latencies = [1000 * (r.done_s - r.sent_s) for r in during_job if r.status == 200]
    versions = [int(r.model_version) for r in sorted(responses, key=lambda r: r.done_s) if r.model_version]
    return {
        "requests_total": len(responses),
        "requests_during_job": len(during_job),
        "requests_during_swap": len(during_swap),
        "failed": sum(r.status != 200 for r in responses),
        "versions_monotonic": versions == sorted(versions),
        "p50_ms_during_job": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "p99_ms_during_job": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
    }


def _job_figures(job: dict[str, Any]) -> dict[str, Any]:
    marks, result = job["marks_s"], job["job"]["result"]
    manifest, publish = result["manifest"], result["publish"]
    report = publish.get("report", {})
    parts = {k: v for k, v in report.items() if isinstance(v, dict) and not v.get("reused", True)}
    return {
        "training_s": round(marks["publish_started"] - marks["running"], 2)
        if {"running", "publish_started"} <= set(marks)
        else None,
        "publish_method": "+".join(sorted({v.get("method", "export") for v in parts.values()})) or "none",
        "changed_tensor_bytes": sum(v.get("changed_bytes", 0) for v in parts.values()),
        "bytes_written": job.get("bytes_written"),
        "post_to_job_id_ms": round(1000 * marks["accepted"], 1),
        "post_to_training_start_s": round(marks.get("running", float("nan")), 2),
        "training_steps": manifest["settings"]["steps"],
        "training_steps_per_s": manifest["steps_per_s"],
        "training_loss_first_last": [manifest["loss_history"]["mean_first_5"], manifest["loss_history"]["mean_last_5"]],
        "publish_s": publish.get("publish_seconds"),
        "post_to_serving_s": round(marks["serving"], 2),
        "new_version": job["new_version"],
    }


async def _measure(facade_url: str, s: SwapSettings, repo: Path, api_key: str) -> dict[str, Any]:
    """Two jobs: one on an idle server (what training alone costs), then one while `concurrency`
    clients keep /generate busy (what users see during a swap). Different seeds, so each job
    publishes a LoRA of its own and each swap is real."""
    alone = await _run_job(facade_url, s, time.monotonic(), None, seed=0, api_key=api_key)
    alone["bytes_written"] = new_bytes(repo, alone["job"]["result"]["publish"])
    t0 = time.monotonic()
    stop = asyncio.Event()
    responses: list[Response] = []
    load = asyncio.create_task(_generate_load(facade_url, s, t0, stop, responses))
    await asyncio.sleep(3.0)  # a few requests on the old version first
    try:
        loaded = await _run_job(facade_url, s, t0, responses, seed=1, api_key=api_key)
        loaded["bytes_written"] = new_bytes(repo, loaded["job"]["result"]["publish"])
        await asyncio.sleep(2.0)  # and a few on the new one
    finally:
        stop.set()
        await load
    marks = loaded["marks_s"]
    return {
        "alone": _job_figures(alone),
        "under_load": {
            **_job_figures(loaded),
            "old_version": min((r.model_version for r in responses if r.model_version), key=int),
            "generate_load": _summarize(
                responses, loaded["posted_at_s"], marks.get("publish_started", marks["job_done"]), marks["serving"]
            ),
        },
    }


def swap(s: SwapSettings) -> dict[str, Any]:
    """Run the measurement on a throw-away copy of the repository; write and return the result."""
    generate_models = list(servers.GENERATE_STACK)
    if not servers.stack_built(s.model_repository, generate_models):
        raise RuntimeError(f"generate is not built in {s.model_repository}: run `make models`")
    with tempfile.TemporaryDirectory(prefix="fluxserve-swap-") as tmp:
        repo, jobs = Path(tmp) / "repo", Path(tmp) / "jobs"
        for name in generate_models:  # hard links: versions are only ever added, never modified
            shutil.copytree(
                s.model_repository / name,
                repo / name,
                copy_function=os.link,
                ignore=shutil.ignore_patterns(".staging-*", "__pycache__"),
            )
        with servers.triton(repo, generate_models, s.log_dir, tag="swap") as triton:
            env = {
                "FLUXSERVE_JOBS_JOBS_DIR": str(jobs),
                "FLUXSERVE_JOBS_MODEL_REPOSITORY": str(repo),
                "FLUXSERVE_JOBS_TRITON_HTTP_URL": triton.http_url,
            }
            api_key = secrets.token_urlsafe(24)  # a throw-away operator key for this run's facade
            facade_env = {**env, "FLUXSERVE_API_KEYS": f"bench:{api_key}"}
            with servers.facade(triton.grpc_url, [GENERATE.name], s.log_dir, extra_env=facade_env) as facade:
                with running_worker(env, s.log_dir / "worker.log"):
                    measured = asyncio.run(_measure(facade.url, s, repo, api_key))
                _write(measured, s)  # kept even if the comparison below fails
                if s.compare_full_export:  # the same idle job, published by fusing + re-exporting
                    full_env = {**env, "FLUXSERVE_FLUX_WEIGHT_PATCHING": "false"}
                    with running_worker(full_env, s.log_dir / "worker-full-export.log"):
                        full = asyncio.run(_run_job(facade.url, s, time.monotonic(), None, seed=2, api_key=api_key))
                    full["bytes_written"] = new_bytes(repo, full["job"]["result"]["publish"])
                    measured["full_export"] = _job_figures(full)
    return _write(measured, s)


def _write(measured: dict[str, Any], s: SwapSettings) -> dict[str, Any]:
    result = {
        "kind": "swap",
        "started_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "environment": environment({}),
        **measured,
    }
    write_json(result, s.out)
    s.out.with_suffix(".md").write_text(render_markdown(result))
    return result


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f}"


def _minus_training(fig: dict[str, Any]) -> float:
    """POST → serving minus the job's training phase (running → publish started, as polled every
    0.2 s): what the service adds around training (queueing, publish, Triton load)."""
    training = fig.get("training_s")
    return float("nan") if training is None else fig["post_to_serving_s"] - training


def render_markdown(r: dict[str, Any]) -> str:
    a, u, st = r["alone"], r["under_load"], r["settings"]
    g = u["generate_load"]

    def both(key: str, fmt: str) -> str:
        return f"{fmt.format(a[key])} / {fmt.format(u[key])}"

    rows = [
        ("POST /train → job id", both("post_to_job_id_ms", "{:.0f}") + " ms"),
        (
            "training steps/s",
            both("training_steps_per_s", "{:.1f}")
            + f" ({st['train_steps']} steps; loss {u['training_loss_first_last'][0]:.3f} → {u['training_loss_first_last'][1]:.3f})",
        ),
        (f"publish ({a['publish_method']} + Triton load)", both("publish_s", "{:.1f}") + " s"),
        ("POST /train → new version serving", both("post_to_serving_s", "{:.1f}") + " s"),
        ("POST /train → serving, minus training", f"{_minus_training(a):.1f} / {_minus_training(u):.1f} s"),
        (
            "bytes written per publish (changed tensors)",
            f"{_mb(a['bytes_written'])} / {_mb(u['bytes_written'])} MB ({_mb(a['changed_tensor_bytes'])} MB)",
        ),
    ]
    full = r.get("full_export")
    compare = (
        []
        if not full
        else [
            "",
            "| idle job, publish by | weight patch | full fuse + re-export |",
            "|---|---|---|",
            f"| publish seconds | {a['publish_s']:.1f} | {full['publish_s']:.1f} |",
            f"| POST /train → serving, minus training | {_minus_training(a):.1f} s | {_minus_training(full):.1f} s |",
            f"| bytes written | {_mb(a['bytes_written'])} MB | {_mb(full['bytes_written'])} MB |",
        ]
    )
    load_rows = [
        (
            "/generate requests during the job / during the swap",
            f"{g['requests_during_job']} / {g['requests_during_swap']}",
        ),
        ("failed requests", f"{g['failed']} of {g['requests_total']}"),
        ("versions never went back", "yes" if g["versions_monotonic"] else "**no**"),
        ("/generate p50 / p99 during the job", f"{g['p50_ms_during_job']} / {g['p99_ms_during_job']} ms"),
    ]
    return "\n".join(
        [
            f"### Training job and hot swap ({r['started_utc']})",
            "",
            f"LoRA jobs on {st['images']} solid-colour {st['resolution']}px squares, trigger word `{st['trigger_word']}`, "
            f"learning rate {st['learning_rate']}: first on an idle server, then while {st['concurrency']} clients keep "
            f"sending /generate ({st['image_side']}×{st['image_side']}, {st['generate_steps']} steps) on the same 2 cores "
            f"(version {u['old_version']} → {u['new_version']}).",
            "",
            "| what | idle / under load |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in rows),
            *compare,
            "",
            "| /generate during the loaded job | measured |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in load_rows),
            "",
        ]
    )
