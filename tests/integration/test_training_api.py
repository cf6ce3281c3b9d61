"""Training jobs end to end: real Triton (on a copy of the repository), the real facade and the
real worker process. Trains a LoRA on solid-colour squares, hot-swaps it in under /generate
load, and covers cancel, restart persistence and bad datasets."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from client.contract import GENERATE
from client.triton_client import TritonClient
from tests.conftest import MODEL_REPOSITORY, PROJECT_ROOT, start_facade, start_triton

pytestmark = pytest.mark.integration

TRIGGER = "zxq"
RED = (220, 30, 30)


def red_zip(n: int = 4, size: int = 64) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            img = io.BytesIO()
            Image.new("RGB", (size, size), RED).save(img, format="PNG")
            zf.writestr(f"img{i}.png", img.getvalue())
            zf.writestr(f"img{i}.txt", "a plain red square")
    return buf.getvalue()


class Stack:
    def __init__(self, root: Path) -> None:
        self.repo = root / "repo"
        self.jobs_dir = root / "jobs"
        # Hard links: versions are only ever added, never modified in place.
        shutil.copytree(MODEL_REPOSITORY, self.repo, copy_function=os.link)
        self.triton = start_triton(self.repo, log_name="test-triton-training.log")
        self.env = {
            "FLUXSERVE_JOBS_JOBS_DIR": str(self.jobs_dir),
            "FLUXSERVE_JOBS_MODEL_REPOSITORY": str(self.repo),
            "FLUXSERVE_JOBS_TRITON_HTTP_URL": self.triton.http_url,
            "FLUXSERVE_API_REQUIRED_MODELS": '["classify","generate"]',
        }
        self.facade = None
        self.worker: subprocess.Popen | None = None
        self.start_services()

    def start_services(self) -> None:
        self.facade = start_facade(self.triton.grpc_url, self.env, ready_path="/readyz")
        log = (PROJECT_ROOT / "build" / "logs" / "test-worker.log").open("ab")
        self.worker = subprocess.Popen([sys.executable, "-m", "training.worker"], cwd=PROJECT_ROOT,
                                       env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT)

    def stop_services(self) -> None:
        self.facade.stop()
        if self.worker and self.worker.poll() is None:
            self.worker.send_signal(2)
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                self.worker.kill()

    def http(self, timeout_s: float = 60) -> httpx.Client:
        return self.facade.client(timeout_s)

    def submit(self, **fields) -> httpx.Response:
        payload = fields.pop("zip", None) or red_zip()
        data = {"trigger_word": TRIGGER, "steps": "40", "learning_rate": "0.01", "resolution": "64", "seed": "0", **{k: str(v) for k, v in fields.items()}}
        with self.http() as http:
            return http.post("/train", data=data, files={"dataset": ("data.zip", payload, "application/zip")})

    def wait(self, job_id: str, statuses: set[str], timeout_s: float = 600) -> dict:
        deadline = time.monotonic() + timeout_s
        with self.http() as http:
            while time.monotonic() < deadline:
                job = http.get(f"/train/{job_id}").json()
                if job["status"] in statuses:
                    return job
                time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {statuses} after {timeout_s}s: {job}")

    def close(self) -> None:
        self.stop_services()
        self.triton.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("training-stack"))
    yield s
    s.close()


def vae_reconstruction_of_red(checkpoint: str) -> np.ndarray:
    """What the (random-weight) VAE makes of the training image: the best any generation can do."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(checkpoint) / "vae").eval()
    x = torch.tensor(np.asarray(Image.new("RGB", (64, 64), RED)), dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)


def test_train_publish_and_hot_swap_under_load(stack: Stack) -> None:
    with TritonClient(stack.triton.grpc_url, timeout_s=300) as direct:
        before = direct.generate(TRIGGER, seed=0, width=64, height=64, steps=4).image
        old_version = direct.generate(TRIGGER, seed=0, width=64, height=64, steps=1).model_version

    # Load: /generate keeps running from before the job until after the new version serves.
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        with stack.http(300) as http:
            while not stop.is_set():
                r = http.post("/generate", json={"prompt": "a red square", "width": 64, "height": 64, "steps": 2, "seed": 1})
                results.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text))

    loader = threading.Thread(target=load)
    loader.start()
    try:
        posted = time.monotonic()
        r = stack.submit()
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert r.json()["status"] == "queued"
        job = stack.wait(job_id, {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", job
        new_version = job["result"]["publish"]["model_version"]
        # Keep loading until responses carry the new version.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(v == new_version for _, v in results[-3:]):
            time.sleep(0.5)
        serving_s = time.monotonic() - posted
    finally:
        stop.set()
        loader.join(300)

    failures = [x for x in results if x[0] != 200]
    assert not failures, failures[:5]
    versions = [int(v) for _, v in results]
    assert versions == sorted(versions), "responses went back to an old version"
    assert str(versions[0]) == old_version and str(versions[-1]) == new_version != old_version

    manifest = job["result"]["manifest"]
    losses = {k: manifest["loss_history"][k] for k in ("mean_first_5", "mean_last_5")}
    print(f"POST->serving {serving_s:.1f}s; requests during job+swap {len(results)}; manifest keys {sorted(manifest)}")
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 40
    assert manifest["trigger_word"] == TRIGGER

    # The new LoRA is what serves, and generation with its trigger word moved toward the data.
    with TritonClient(stack.triton.grpc_url, timeout_s=300) as direct:
        after = direct.generate(TRIGGER, seed=0, width=64, height=64, steps=4).image
    gen_manifest = json.loads((stack.repo / GENERATE.name / new_version / "fluxserve_manifest.json").read_text())
    target = vae_reconstruction_of_red(gen_manifest["provenance"]["checkpoint"]).astype(float)
    d_before = np.abs(before.astype(float) - target).mean()
    d_after = np.abs(after.astype(float) - target).mean()
    print(f"distance to training images (VAE-reconstructed): before {d_before:.2f} after {d_after:.2f}; losses {losses}")
    # The new weights are what serves. Whether the picture moves toward the data is only
    # observable in latent space with this random-weight VAE (its decoder maps almost any latent
    # to the same grey); tests/unit/test_flux_lora.py asserts that move on the trainer's output.
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 0.5
    assert manifest["loss_history"]["mean_last_5"] < manifest["loss_history"]["mean_first_5"]
    with stack.http() as http:
        assert http.post("/generate", json={"prompt": "x", "width": 64, "height": 64, "steps": 1}).json()["prompt"].startswith(TRIGGER)


def test_sse_progress_stream(stack: Stack) -> None:
    job_id = stack.submit(steps=5, publish="false").json()["job_id"]
    events = []
    with stack.http(300) as http, http.stream("GET", f"/train/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                events.append(line.split(":", 1)[1].strip())
    assert events[-1] == "status" and "progress" in events[:-1] or events == ["status"]
    assert stack.wait(job_id, {"succeeded"})["result"].get("publish") is None


def test_cancel_running_and_queued(stack: Stack) -> None:
    running = stack.submit(steps=5000, publish="false").json()["job_id"]
    queued = stack.submit(steps=5000, publish="false").json()["job_id"]
    stack.wait(running, {"running"})
    deadline = time.monotonic() + 300
    with stack.http() as http:  # cancel mid-training, not while the model is still loading
        while time.monotonic() < deadline and not http.get(f"/train/{running}").json()["progress"].get("step"):
            time.sleep(0.3)
    with stack.http() as http:
        q = http.delete(f"/train/{queued}").json()
        assert q["status"] == "cancelled"
        r = http.delete(f"/train/{running}").json()
        assert r["cancel_requested"] is True
        assert http.delete(f"/train/{queued}").status_code == 409
        assert http.delete("/train/nope").status_code == 404
    job = stack.wait(running, {"cancelled", "failed", "succeeded"}, timeout_s=120)
    assert job["status"] == "cancelled"
    assert 0 < job["progress"].get("step", 0) < 5000
    time.sleep(2)
    with stack.http() as http:
        q = http.get(f"/train/{queued}").json()
    assert q["status"] == "cancelled" and q["progress"] == {}  # never started


def test_job_list_survives_restart(stack: Stack) -> None:
    with stack.http() as http:
        before = http.get("/train").json()["jobs"]
    assert len(before) >= 3
    assert [j["created_unix"] for j in before] == sorted((j["created_unix"] for j in before), reverse=True)
    stack.stop_services()
    stack.start_services()
    with stack.http() as http:
        after = http.get("/train").json()["jobs"]
    assert [(j["job_id"], j["status"]) for j in after] == [(j["job_id"], j["status"]) for j in before]


def _zip(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _png() -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (32, 32), RED).save(b, format="PNG")
    return b.getvalue()


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"this is not a zip", 415),
        (_zip({"notes.txt": b"hello"}), 422),
        (_zip({"broken.png": b"\x89PNG\r\n\x1a\n garbage"}), 422),
        (_zip({"../escape.png": _png()}), 422),
        (_zip({"/abs.png": _png()}), 422),
        (_zip({"ok.png": _png()}, symlink="link.png"), 422),
        (_zip({"ok.png": _png(), "bomb.png": b"\0" * (50 << 20)}), 422),
        (_zip({f"{i}.png": _png() for i in range(250)}), 422),
    ],
    ids=["not-zip", "no-images", "corrupt-image", "dotdot", "absolute", "symlink", "bomb", "too-many"],
)
def test_bad_datasets_refused(stack: Stack, payload: bytes, status: int) -> None:
    with stack.http() as http:
        count = len(http.get("/train").json()["jobs"])
        r = http.post("/train", data={"trigger_word": TRIGGER}, files={"dataset": ("d.zip", payload, "application/zip")})
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"]
        assert len(http.get("/train").json()["jobs"]) == count  # nothing queued
    assert not (stack.jobs_dir.parent / "escape.png").exists()
    assert not any(p.name == "escape.png" for p in stack.jobs_dir.rglob("*"))


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [({"trigger_word": ""}, "trigger"), ({"steps": "0"}, "steps"), ({"rank": "1000"}, "rank"), ({"resolution": "100"}, "resolution"), ({"kind": "other"}, "kind")],
)
def test_bad_fields_refused(stack: Stack, fields: dict, fragment: str) -> None:
    data = {"trigger_word": TRIGGER, **fields}
    with stack.http() as http:
        r = http.post("/train", data=data, files={"dataset": ("d.zip", red_zip(1), "application/zip")})
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"]["message"]
