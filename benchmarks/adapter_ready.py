"""`fluxserve-bench adapter-ready`: from a LoRA job's `succeeded` to its first image (issue 27).

A job with publish=adapter ends by writing its adapter into the store; the transformer loads it into
a bank slot when a request first names it, with no model load and no new version. This measures
what that costs a user, on a throw-away copy of the model repository (weights hard-linked) with the
real Triton, facade and training worker: one idle adapter job on synthetic solid-colour squares,
then, as soon as a poll sees it succeeded, /generate naming the adapter (the first image), again
(the same adapter, loaded), and without an adapter, all with the same small settings.

- `succeeded_to_first_image_s`: the job record's time of `succeeded` (the worker's clock; the same
  machine) to the first image's answer. Includes the poll's lag and the generation itself.
- `first_image_over_warm_s`: the first image's generation less the warm one's: what loading the
  adapter on first use adds. Issue 27's time-to-serve goal bounds `succeeded_to_first_image_s`
  less a warm generation, reported as `ready_s`.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks import servers
from benchmarks.environment import environment
from benchmarks.report import write_json
from benchmarks.swap import solid_color_zip
from common.paths import PROJECT_ROOT
from contract.specs import GENERATE
from publish.adapters import served_bank_layout
from training.worker import running_worker

log = logging.getLogger(__name__)

RESULT_FILE = PROJECT_ROOT / "benchmarks" / "results" / "adapter_ready.json"
ADAPTER_NAME = "bench-ready"


@dataclass(frozen=True)
class AdapterReadySettings:
    image_side: int = 64
    generate_steps: int = 2
    train_steps: int = 20
    learning_rate: float = 0.01
    resolution: int = 64
    images: int = 4
    rank: int = 4
    trigger_word: str = "zxq"
    poll_s: float = 0.05
    """How often the job is polled near its end: part of what a user would wait."""
    timeout_s: float = 900.0
    model_repository: Path = servers.MODEL_REPOSITORY
    out: Path = RESULT_FILE
    log_dir: Path = servers.LOG_DIR


@dataclass(frozen=True)
class Generation:
    done_unix: float
    inference_s: float
    lora: dict[str, Any] | None
    model_version: str


def _generate(http: httpx.Client, s: AdapterReadySettings, lora: str | None) -> Generation:
    body: dict[str, Any] = {"prompt": "a red square", "width": s.image_side, "height": s.image_side}
    body |= {"steps": s.generate_steps, "seed": 1, **({"lora": lora} if lora else {})}
    r = http.post("/generate", json=body)
    done = time.time()
    if r.status_code != 200:
        raise RuntimeError(f"/generate (lora {lora}) answered {r.status_code}: {r.text[:300]}")
    answer = r.json()
    return Generation(done, answer["timings"]["inference_s"], answer.get("lora"), answer["model_version"])


def _job(http: httpx.Client, s: AdapterReadySettings) -> dict[str, Any]:
    """Submit the adapter job and poll it to its end; the final record."""
    fields = {
        "trigger_word": s.trigger_word,
        "steps": s.train_steps,
        "learning_rate": s.learning_rate,
        "resolution": s.resolution,
        "rank": s.rank,
        "seed": 0,
        "publish": "adapter",
        "name": ADAPTER_NAME,
    }
    upload = {"dataset": ("data.zip", solid_color_zip(s.images, s.resolution), "application/zip")}
    r = http.post("/train", data={k: str(v) for k, v in fields.items()}, files=upload)
    if r.status_code != 202:
        raise RuntimeError(f"POST /train answered {r.status_code}: {r.text[:300]}")
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + s.timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/train/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
            return job
        time.sleep(s.poll_s)
    raise RuntimeError(f"job {job_id} did not finish in {s.timeout_s:.0f}s")


def figures(job: dict[str, Any], noticed_unix: float, first: Generation, warm: Generation, plain: Generation) -> dict:
    """The result's numbers from the job record and the three answers (seconds, rounded)."""
    succeeded = float(job["updated_unix"])

    def r(x: float) -> float:
        return round(x, 3)

    return {
        "adapter": job["result"]["publish"]["adapter"],
        "served_lora": first.lora,
        "model_version_unchanged": first.model_version == warm.model_version == plain.model_version,
        "poll_lag_s": r(noticed_unix - succeeded),
        "succeeded_to_first_image_s": r(first.done_unix - succeeded),
        "first_generation_s": r(first.inference_s),
        "warm_generation_s": r(warm.inference_s),
        "no_adapter_generation_s": r(plain.inference_s),
        "first_image_over_warm_s": r(first.inference_s - warm.inference_s),
        "ready_s": r(first.done_unix - succeeded - warm.inference_s),
    }


def _measure(url: str, s: AdapterReadySettings, api_key: str) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {api_key}"}) as http:
        plain_before = _generate(http, s, None)  # the stack warm before the job
        job = _job(http, s)
        noticed = time.time()
        first = _generate(http, s, ADAPTER_NAME)
        warm = _generate(http, s, ADAPTER_NAME)
        plain = _generate(http, s, None)
    result = figures(job, noticed, first, warm, plain)
    result["model_version_unchanged"] &= plain_before.model_version == plain.model_version
    return result


def adapter_ready(s: AdapterReadySettings) -> dict[str, Any]:
    """Run the measurement on a throw-away copy of the repository; write and return the result."""
    generate_models = list(servers.GENERATE_STACK)
    if not servers.stack_built(s.model_repository, generate_models):
        raise RuntimeError(f"generate is not built in {s.model_repository}: run `make models`")
    served_bank_layout(s.model_repository)  # AdapterRefused, saying how to export the branch, if none
    with tempfile.TemporaryDirectory(prefix="fluxserve-adapter-ready-") as tmp:
        repo, jobs = Path(tmp) / "repo", Path(tmp) / "jobs"
        for name in generate_models:  # hard links: versions are only ever added, never modified
            shutil.copytree(
                s.model_repository / name,
                repo / name,
                copy_function=os.link,
                ignore=shutil.ignore_patterns(".staging-*", "__pycache__"),
            )
        with servers.triton(repo, generate_models, s.log_dir, tag="adapter-ready") as triton:
            env = {
                "FLUXSERVE_JOBS_JOBS_DIR": str(jobs),
                "FLUXSERVE_JOBS_MODEL_REPOSITORY": str(repo),
                "FLUXSERVE_JOBS_TRITON_HTTP_URL": triton.http_url,
            }
            api_key = secrets.token_urlsafe(24)  # a throw-away operator key for this run's facade
            facade_env = {**env, "FLUXSERVE_API_KEYS": f"bench:{api_key}"}
            with servers.facade(triton.grpc_url, [GENERATE.name], s.log_dir, extra_env=facade_env) as facade:
                with running_worker(env, s.log_dir / "worker-adapter-ready.log"):
                    measured = _measure(facade.url, s, api_key)
    result = {
        "kind": "adapter_ready",
        "started_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "environment": environment({}),
        **measured,
    }
    write_json(result, s.out)
    s.out.with_suffix(".md").write_text(render_markdown(result))
    return result


def render_markdown(result: dict[str, Any]) -> str:
    rows = [
        ("job `succeeded` → first image answered", "succeeded_to_first_image_s"),
        ("… of which the poll's lag", "poll_lag_s"),
        ("first image's generation (adapter loaded on first use)", "first_generation_s"),
        ("the same, adapter loaded", "warm_generation_s"),
        ("the same, no adapter", "no_adapter_generation_s"),
        ("**ready: `succeeded` → first image, less a warm generation** (goal ≤ 2 s)", "ready_s"),
    ]
    lines = [
        f"#### An adapter job to its first image ({result['started_utc']})",
        "",
        "`fluxserve-bench adapter-ready`: one LoRA job with `publish=adapter` through the real Triton, facade "
        "and worker, then `/generate` naming the adapter as soon as a poll sees the job `succeeded`.",
        "",
        "| | seconds |",
        "|---|---|",
        *(f"| {label} | {result[key]} |" for label, key in rows),
        "",
        f"Model version unchanged by the job: {result['model_version_unchanged']}; the answer named "
        f"`{(result.get('served_lora') or {}).get('name')}`.",
        "",
    ]
    return "\n".join(lines)
