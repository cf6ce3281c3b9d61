"""Training jobs end to end: real Triton (on a copy of the repository), the real facade and the
real worker process. Trains a LoRA on solid-colour squares, hot-swaps it in under /generate
load, and covers cancel and restart persistence. Bad datasets and fields are refused before
anything is queued: checked in-process in tests/unit/facade/test_http_train.py."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.swap import solid_color_zip
from client.triton_client import TritonClient
from common.paths import BUILD_DIR
from contract.codec import GenerateResult
from contract.specs import (
    FLUX_TEXT_ENCODER,
    FLUX_TEXT_ENCODER_2,
    FLUX_TRANSFORMER,
    FLUX_VAE_DECODER,
    GENERATE,
    GENERATE_DEFAULTS,
    GENERATE_STREAM,
    GenerateParams,
)
from tests.conftest import MODEL_REPOSITORY, PROJECT_ROOT, start_facade, start_triton
from tests.small_classifier_data import small_classifier_env
from training.worker import running_worker

pytestmark = pytest.mark.integration

TRIGGER = "zxq"
UNCHANGED_BY_LORA = (FLUX_TEXT_ENCODER, FLUX_TEXT_ENCODER_2, FLUX_VAE_DECODER)
RED = (220, 30, 30)
BLUE = (30, 30, 220)
SWAP_PROMPT = "a red square"
MAX_PATCH_LATENT_ERROR = 1e-4
"""Patched vs re-exported transformer outputs agree to 1e-5 per call (tests/unit/test_weight_patch.py);
four denoising steps may add up a little of that."""


def red_zip(n: int = 4, size: int = 64) -> bytes:
    return solid_color_zip(n, size, RED, caption="a plain red square")


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
            # Classifier jobs here check the job kind's machinery (train, gate, publish, swap);
            # the default model's quality is test_classifier_quality's.
            **small_classifier_env(root),
        }
        self.facade = None
        self.services = ExitStack()
        self.start_services()

    def start_services(self) -> None:
        self.facade = start_facade(self.triton.grpc_url, self.env, ready_path="/readyz")
        self.services.enter_context(running_worker(self.env, BUILD_DIR / "logs" / "test-worker.log"))

    def stop_services(self) -> None:
        self.facade.stop()
        self.services.close()

    def http(self, timeout_s: float = 60) -> httpx.Client:
        return self.facade.client(timeout_s)

    def submit(self, **fields) -> httpx.Response:
        payload = fields.pop("zip", None) or red_zip()
        data = {
            "trigger_word": TRIGGER,
            "steps": "40",
            "learning_rate": "0.01",
            "resolution": "64",
            "seed": "0",
            **{k: str(v) for k, v in fields.items()},
        }
        with self.http() as http:
            return http.post("/train", data=data, files={"dataset": ("data.zip", payload, "application/zip")})

    def wait(self, job_id: str, statuses: set[str], timeout_s: float = 600) -> dict:
        deadline = time.monotonic() + timeout_s
        # A poll may wait on SQLite behind the worker's writes: on a loaded machine that passed 60 s.
        with self.http(300) as http:
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


def red_latent(checkpoint: str) -> np.ndarray:
    """The training image in the VAE's latent space: where a LoRA that learned it should land."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(checkpoint) / "vae").eval()
    x = (
        torch.tensor(np.asarray(Image.new("RGB", (64, 64), RED)), dtype=torch.float32).permute(2, 0, 1)[None] / 127.5
        - 1
    )
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean.numpy()


def served_latents(
    grpc_url: str, repo: Path, generate_version: str, prompt: str, seeds: Iterable[int]
) -> list[np.ndarray]:
    """The final latents the *served* FLUX components of a `generate` version produce: the loop
    `generate` runs, with each component called over gRPC at the version that `generate` pins,
    captured where they enter the VAE decoder. The random-weight VAE decodes nearly every latent
    to the same grey, so this is where a trained LoRA's effect on served output is observable."""
    import tritonclient.grpc as grpcclient

    from contract.codec import flux_component_feeds
    from contract.specs import FLUX_COMPONENTS, FLUX_IO_NAMES
    from serving.flux_loop import FluxLoop

    version_dir = repo / GENERATE.name / generate_version
    components = json.loads((version_dir / "components.json").read_text())
    client = grpcclient.InferenceServerClient(grpc_url)
    captured: list[np.ndarray] = []

    def caller(model: str, capture: bool = False):
        output = FLUX_IO_NAMES[model][1][0]

        def call(*args: np.ndarray, **kwargs: np.ndarray) -> np.ndarray:
            inputs = []
            for name, arr in flux_component_feeds(model, args, kwargs).items():
                inputs.append(
                    grpcclient.InferInput(name, list(arr.shape), FLUX_COMPONENTS[model].input(name).wire_dtype)
                )
                inputs[-1].set_data_from_numpy(arr)
                if capture:
                    captured.append(arr)
            result = client.infer(
                model, inputs, model_version=str(components[model]), outputs=[grpcclient.InferRequestedOutput(output)]
            )
            return result.as_numpy(output)

        return call

    loop = FluxLoop(
        version_dir / "pipeline",
        caller(FLUX_TEXT_ENCODER),
        caller(FLUX_TEXT_ENCODER_2),
        caller(FLUX_TRANSFORMER),
        caller(FLUX_VAE_DECODER, capture=True),
    )
    try:
        for seed in seeds:
            loop(GenerateParams(prompt=prompt, width=64, height=64, steps=4, guidance=3.5, seed=seed))
    finally:
        client.close()
    return captured


def facade_prompt_for(stack: Stack, prompt: str, expect: str, timeout_s: float = 30) -> str:
    """The prompt /generate sends to the model, once it equals `expect` or at the timeout: the
    facade adds the trigger words of the newest ready `generate` version (api.state.AppState)."""
    deadline = time.monotonic() + timeout_s
    with stack.http(300) as http:
        while True:
            seen = http.post("/generate", json={"prompt": prompt, "width": 64, "height": 64, "steps": 1}).json()[
                "prompt"
            ]
            if seen == expect or time.monotonic() > deadline:
                return seen
            time.sleep(1)


def test_train_publish_and_hot_swap_under_load(stack: Stack) -> None:
    with TritonClient(stack.triton.grpc_url, timeout_s=300) as direct:
        before = direct.generate(GenerateParams(prompt=TRIGGER, seed=0, width=64, height=64, steps=4)).image
        old_version = direct.generate(
            GenerateParams(prompt=TRIGGER, seed=0, width=64, height=64, steps=1)
        ).model_version
    seeds = range(3)
    latents_before = served_latents(stack.triton.grpc_url, stack.repo, old_version, TRIGGER, seeds)

    # Load: /generate keeps running from before the job until after the new version serves.
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        with stack.http(300) as http:
            while not stop.is_set():
                r = http.post(
                    "/generate", json={"prompt": "a red square", "width": 64, "height": 64, "steps": 2, "seed": 1}
                )
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

    # The LoRA has transformer weights only: CLIP, T5 and the VAE keep their versions.
    old_components = json.loads((stack.repo / GENERATE.name / old_version / "components.json").read_text())
    new_components = job["result"]["publish"]["components"]
    assert new_components[FLUX_TRANSFORMER] > old_components[FLUX_TRANSFORMER]
    assert {m: new_components[m] for m in UNCHANGED_BY_LORA} == {m: old_components[m] for m in UNCHANGED_BY_LORA}
    assert sorted(job["result"]["publish"]["created"]) == sorted(
        [FLUX_TRANSFORMER, GENERATE.name, GENERATE_STREAM.name]
    )

    manifest = job["result"]["manifest"]
    losses = {k: manifest["loss_history"][k] for k in ("mean_first_5", "mean_last_5")}
    print(
        f"POST->serving {serving_s:.1f}s; requests during job+swap {len(results)}; "
        f"training {manifest['steps_per_s']} steps/s"
    )
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 40
    assert manifest["trigger_word"] == TRIGGER

    # The new LoRA is what serves, and generation with its trigger word moved toward the data.
    with TritonClient(stack.triton.grpc_url, timeout_s=300) as direct:
        after = direct.generate(GenerateParams(prompt=TRIGGER, seed=0, width=64, height=64, steps=4)).image
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 0.5
    gen_manifest = json.loads((stack.repo / GENERATE.name / new_version / "fluxserve_manifest.json").read_text())
    target = red_latent(gen_manifest["provenance"]["checkpoint"])
    latents_after = served_latents(stack.triton.grpc_url, stack.repo, new_version, TRIGGER, seeds)
    d_before = [float(np.linalg.norm(z - target)) for z in latents_before]
    d_after = [float(np.linalg.norm(z - target)) for z in latents_after]
    print(
        f"served latent L2 to the training image's latent, seeds {list(seeds)}: before {d_before} after {d_after}; "
        f"losses {losses}"
    )
    # Measured about 106 -> 96 (10% closer) for every seed after 40 steps; 4% leaves room for noise.
    assert all(a < 0.96 * b for a, b in zip(d_after, d_before))
    assert manifest["loss_history"]["mean_last_5"] < manifest["loss_history"]["mean_first_5"]
    assert facade_prompt_for(stack, "x", expect=f"{TRIGGER}, x") == f"{TRIGGER}, x"


def test_sse_progress_stream(stack: Stack) -> None:
    job_id = stack.submit(steps=5, publish="false").json()["job_id"]
    events = []
    with stack.http(300) as http, http.stream("GET", f"/train/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                events.append(line.split(":", 1)[1].strip())
    assert events[-1] == "status" and "progress" in events[:-1] or events == ["status"]
    assert stack.wait(job_id, {"succeeded"})["result"].get("publish") is None


def test_two_adapter_jobs_are_served_side_by_side_with_no_new_version(stack: Stack) -> None:
    """Issue 27: two LoRA jobs with publish=adapter (one trained on red squares, one on blue), through
    the real worker, are usable by the next request that names them, with no model version change:
    the same seed with A, B and none gives three different images and A again gives A's; the answer
    names the adapter and the hash its job reported; deleted, one is a 404 naming it while the other
    still serves. The time from `succeeded` to the first image is `fluxserve-bench adapter-ready`'s,
    not a threshold here."""
    from common.adapter_bank import AdapterRefused
    from publish.adapters import served_bank_layout
    from publish.repository import versions

    try:
        served_bank_layout(stack.repo)
    except AdapterRefused as e:
        pytest.skip(f"the built transformer serves no adapters (rebuild the models with its adapter branch): {e}")
    served = {m: versions(stack.repo, m) for m in (GENERATE.name, GENERATE_STREAM.name, FLUX_TRANSFORMER)}
    datasets = {"red-square": red_zip(), "blue-square": solid_color_zip(4, 64, BLUE, caption="a plain blue square")}
    # Both queued at once: the worker takes them one after the other.
    submitted = {
        name: stack.submit(steps=10, publish="adapter", name=name, zip=data) for name, data in datasets.items()
    }
    sha256 = {}
    for name, r in submitted.items():
        assert r.status_code == 202, r.text
        job = stack.wait(r.json()["job_id"], {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", job
        adapter = job["result"]["publish"]["adapter"]
        assert adapter["name"] == name and len(adapter["sha256"]) == 64
        sha256[name] = adapter["sha256"]
    image = {"prompt": "a square", "width": 64, "height": 64, "steps": 2, "seed": 0}
    with stack.http(300) as http:
        answers = {}
        for key in ("red-square", "blue-square", None, "red-square again"):
            lora = key.split()[0] if key else None
            r = http.post("/generate", json={**image, **({"lora": lora} if lora else {})})
            assert r.status_code == 200, r.text
            answers[key] = r.json()
            expected = {"name": lora, "sha256": sha256[lora], "scale": 1.0} if lora else None
            assert answers[key]["lora"] == expected
        assert answers["red-square"]["prompt"] == f"{TRIGGER}, a square"
        assert len({a["model_version"] for a in answers.values()}) == 1
        pixels = {k: decoded_image(a["images"][0]) for k, a in answers.items()}
        for a, b in (("red-square", "blue-square"), ("red-square", None), ("blue-square", None)):
            assert np.abs(pixels[a] - pixels[b]).mean() > 1.0, f"{a} and {b} gave the same image"
        assert np.abs(pixels["red-square"] - pixels["red-square again"]).max() <= 1.0
        assert sorted(a["name"] for a in http.get("/loras").json()["loras"]) == ["blue-square", "red-square"]
        assert http.delete("/loras/red-square").status_code == 200
        gone = http.post("/generate", json={**image, "lora": "red-square"})
        assert gone.status_code == 404 and gone.json()["error"]["message"] == "no adapter named 'red-square'"
        still = http.post("/generate", json={**image, "lora": "blue-square"})
        assert still.status_code == 200, still.text
        assert np.abs(decoded_image(still.json()["images"][0]) - pixels["blue-square"]).max() <= 1.0
        assert http.delete("/loras/blue-square").status_code == 200
    assert {m: versions(stack.repo, m) for m in served} == served


def decoded_image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.float32)


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
    # Three jobs at least, whatever ran before: a queued job cancelled at once ends there.
    with stack.http() as http:
        for _ in range(max(0, 3 - len(http.get("/train").json()["jobs"]))):
            job_id = stack.submit(steps=5000, publish="false").json()["job_id"]
            http.delete(f"/train/{job_id}")
            stack.wait(job_id, {"cancelled", "failed", "succeeded"}, timeout_s=120)
        before = http.get("/train").json()["jobs"]
    assert len(before) >= 3
    assert [j["created_unix"] for j in before] == sorted((j["created_unix"] for j in before), reverse=True)
    stack.stop_services()
    stack.start_services()
    with stack.http() as http:
        after = http.get("/train").json()["jobs"]
    assert [(j["job_id"], j["status"]) for j in after] == [(j["job_id"], j["status"]) for j in before]


def _serving_classify_manifest(stack: Stack) -> Path:
    from publish.model_control import ready_versions

    return stack.repo / "classify" / ready_versions(stack.triton.http_url, "classify")[-1] / "fluxserve_manifest.json"


def test_classifier_job_worse_than_serving_is_not_published(stack: Stack) -> None:
    """The accuracy gate: a classifier that scores below the serving one on the test split ends
    `failed` with both figures, and the serving version does not change."""
    from publish.model_control import ready_versions

    serving_before = ready_versions(stack.triton.http_url, "classify")
    with stack.http() as http:
        # One epoch at the smallest learning rate allowed: barely trained, far below the default.
        r = http.post("/train", data={"kind": "classifier", "steps": "1", "learning_rate": "1e-7", "seed": "0"})
    assert r.status_code == 202, r.text
    job = stack.wait(r.json()["job_id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "failed", job
    gate = job["result"]["accuracy_gate"]
    assert gate["test_accuracy"] < gate["serving_test_accuracy"], gate
    assert f"{gate['test_accuracy']:.4f}" in job["error"] and f"{gate['serving_test_accuracy']:.4f}" in job["error"]
    assert job["result"]["publish"]["status"] == "refused"
    assert ready_versions(stack.triton.http_url, "classify") == serving_before


def test_classifier_job_trains_publishes_and_serves(stack: Stack) -> None:
    """The classifier fine-tuning as a job kind: trained, exported, swapped in, answering."""
    # One epoch does not reach the default model's accuracy: stand in a weaker serving model by
    # rewriting its recorded figure (a new file: the repository copy is hard-linked to the real one).
    manifest_path = _serving_classify_manifest(stack)
    serving = json.loads(manifest_path.read_text())
    serving.setdefault("report", {})["test_accuracy"] = 0.5
    manifest_path.unlink()
    manifest_path.write_text(json.dumps(serving))
    with stack.http() as http:
        before = http.post("/classify", json={"text": "can I see you in the kitchen?"})
        assert before.status_code == 200
        r = http.post("/train", data={"kind": "classifier", "steps": "1", "seed": "0"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    job = stack.wait(job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    assert job["result"]["publish"]["status"] == "succeeded"
    assert 0.5 < job["result"]["test"]["accuracy"] <= 1.0
    assert job["result"]["accuracy_gate"] == {
        "test_accuracy": job["result"]["test"]["accuracy"],
        "serving_test_accuracy": 0.5,
    }
    new_version = job["result"]["publish"]["model_version"]
    from publish.model_control import ready_versions

    assert new_version in ready_versions(stack.triton.http_url, "classify")
    manifest = json.loads((stack.repo / "classify" / new_version / "fluxserve_manifest.json").read_text())
    # The job shows paths relative to its folder; the manifest (internal) keeps the real one.
    assert job["result"]["model_dir"] == "model"
    assert Path(manifest["provenance"]["classifier"]) == stack.jobs_dir / job_id / "model"
    assert manifest["report"]["test_accuracy"] == job["result"]["test"]["accuracy"]
    with stack.http() as http:
        after = http.post("/classify", json={"texts": ["see you tomorrow", "make an image of you in Paris"]})
    assert after.status_code == 200, after.text
    assert all(abs(sum(res["scores"].values()) - 1) < 1e-4 for res in after.json()["results"])


def test_classifier_swap_changes_the_uncertainty_threshold(stack: Stack, tmp_path: Path) -> None:
    """`uncertain` uses the threshold of the classify version that answered: swapping in a version
    published with the threshold that flips this text's flag (0: nothing is uncertain; 1.5:
    everything is) flips it at once, with no facade restart and no cache to expire. One export,
    towards whichever side the serving version is not on (each export is half a minute here)."""
    from common.paths import CLASSIFIER_MODEL_DIR

    text = {"text": "make an image of you in Paris"}
    with stack.http() as http:
        before = http.post("/classify", json=text).json()["uncertain"]
    model = tmp_path / "model"
    shutil.copytree(CLASSIFIER_MODEL_DIR, model)
    labels = json.loads((model / "labels.json").read_text())
    threshold = 0.0 if before else 1.5
    (model / "labels.json").write_text(json.dumps({**labels, "recommended_threshold": threshold}))
    cli = Path(sys.executable).parent / "fluxserve-export"
    run = subprocess.run(
        [str(cli), "--repo", str(stack.repo), "--triton-url", stack.triton.http_url, "classifier"]
        + ["--model-dir", str(model)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with stack.http() as http:
        assert http.post("/classify", json=text).json()["uncertain"] is (not before)


def test_failed_publish_keeps_the_previous_version_serving(stack: Stack, tmp_path: Path, monkeypatch) -> None:
    """A LoRA job whose new transformer cannot be loaded by Triton: the job's publish step is
    marked failed, the new version folders are rolled back and the old version keeps serving.

    The job runs in this process (not the worker) so the fault can be injected into the exported
    artifact itself: the real export runs, then its transformer file is replaced with garbage."""
    import publish.flux as flux_publish
    from contract.specs import FLUX_COMPONENTS
    from publish.model_control import ready_versions
    from publish.repository import versions
    from training.jobs import JobSettings, job_dir
    from training.lora_dataset import save_prepared, validate_and_extract
    from training.lora_settings import LoraTrainSettings
    from training.stores import job_store
    from training.tasks import run_job

    real_publish = flux_publish.publish_flux

    def publish_with_a_broken_transformer(repo: Path, **kwargs):
        out = real_publish(repo, **kwargs)
        broken = repo / FLUX_TRANSFORMER / str(out[FLUX_TRANSFORMER]) / "model.onnx"
        broken.unlink()  # it is a hard link to the export's own file: break only this copy
        broken.write_bytes(b"not an ONNX model")
        return out

    monkeypatch.setattr(flux_publish, "publish_flux", publish_with_a_broken_transformer)
    settings = JobSettings(jobs_dir=stack.jobs_dir, model_repository=stack.repo, triton_http_url=stack.triton.http_url)
    store = job_store(settings)
    models = [*FLUX_COMPONENTS, GENERATE.name]
    on_disk = {m: versions(stack.repo, m) for m in models}
    serving = {m: ready_versions(stack.triton.http_url, m) for m in models}
    with TritonClient(stack.triton.grpc_url, timeout_s=300) as direct:
        old_version = direct.generate(
            GenerateParams(prompt="a red square", seed=3, width=64, height=64, steps=1)
        ).model_version

    job = store.create("flux_lora", {})
    zip_path = tmp_path / "data.zip"
    zip_path.write_bytes(red_zip(2))
    job_dir(settings, job.id).mkdir(parents=True)
    prepared = validate_and_extract(zip_path, job_dir(settings, job.id) / "dataset", TRIGGER)
    save_prepared(prepared)
    train = LoraTrainSettings(steps=3, resolution=64, seed=0, learning_rate=0.01)
    store.update(job.id, params={"train": train.model_dump(), "trigger_word": prepared.trigger_word, "publish": True})
    run_job(settings, job.id)

    job = store.get(job.id)
    assert job is not None and job.status == "failed", job
    assert "publishing failed" in (job.error or "")
    assert job.result["publish"]["status"] == "failed" and job.result["publish"]["error"]
    assert job.result["manifest"]["trigger_word"] == TRIGGER  # the trained LoRA is kept
    assert {m: versions(stack.repo, m) for m in models} == on_disk
    assert {m: ready_versions(stack.triton.http_url, m) for m in models} == serving
    with TritonClient(stack.triton.grpc_url, timeout_s=300) as direct:
        assert (
            direct.generate(GenerateParams(prompt="a red square", seed=3, width=64, height=64, steps=1)).model_version
            == old_version
        )
    with stack.http(300) as http:
        r = http.post("/generate", json={"prompt": "a red square", "width": 64, "height": 64, "steps": 1})
    assert r.status_code == 200 and r.json()["model_version"] == old_version


def test_export_cli_serves_a_trained_loras_own_trigger_word(stack: Stack) -> None:
    """A LoRA trained by a job, re-exported through the CLI without --trigger-word, serves with the
    trigger word it was trained with: training writes the LoRA manifest export reads (one name)."""
    from common.flux_assets import LORA_MANIFEST

    job = stack.submit(steps=4, publish="false").json()
    done = stack.wait(job["job_id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    lora_dir = stack.jobs_dir / job["job_id"] / "lora"
    assert json.loads((lora_dir / LORA_MANIFEST).read_text())["trigger_word"] == TRIGGER
    cli = Path(sys.executable).parent / "fluxserve-export"
    run = subprocess.run(
        [str(cli), "--repo", str(stack.repo), "--triton-url", stack.triton.http_url, "flux", "--lora", str(lora_dir)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert facade_prompt_for(stack, "x", expect=f"{TRIGGER}, x") == f"{TRIGGER}, x"


def test_export_cli_swaps_in_a_lora_from_elsewhere(stack: Stack, tmp_path: Path) -> None:
    """`fluxserve-export --triton-url ... flux --lora ... --lora-scale ...` puts a LoRA trained
    elsewhere into service on a running Triton (here: the default LoRA at another scale)."""
    with TritonClient(stack.triton.grpc_url, timeout_s=300) as direct:
        old = direct.generate(GenerateParams(prompt="a red square", seed=5, width=64, height=64, steps=2))
    cli = Path(sys.executable).parent / "fluxserve-export"
    done = subprocess.run(
        [
            str(cli),
            "--repo",
            str(stack.repo),
            "--triton-url",
            stack.triton.http_url,
            "flux",
            "--lora-scale",
            "0.25",
            "--trigger-word",
            "Elsewhere",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with TritonClient(stack.triton.grpc_url, timeout_s=300) as direct:
        new = direct.generate(GenerateParams(prompt="a red square", seed=5, width=64, height=64, steps=2))
    assert int(new.model_version) > int(old.model_version)
    manifest = json.loads((stack.repo / GENERATE.name / new.model_version / "fluxserve_manifest.json").read_text())
    assert manifest["provenance"]["lora_scale"] == 0.25 and manifest["provenance"]["trigger_word"] == "Elsewhere"
    assert np.abs(new.image.astype(int) - old.image.astype(int)).mean() > 0  # other weights serve
    assert facade_prompt_for(stack, "x", expect="Elsewhere, x") == "Elsewhere, x"
    assert_served_patch_equals_full_reexport(stack, new, old, manifest["provenance"], tmp_path)


def assert_served_patch_equals_full_reexport(
    stack: Stack, served: GenerateResult, previous: GenerateResult, provenance: dict, tmp_path: Path
) -> None:
    """Issue 11's parity, through Triton: the image the patched version serves equals, within 1/255,
    the image of a full fuse-and-re-export of the same LoRA at the same scale (run by the serving
    loop in process on the re-exported transformer and the served versions of the rest)."""
    from export.flux.lora import load_pipeline
    from export.flux.onnx_export import export_all
    from export.flux.transformer_precision import INT8_DIR, quantize_export, read_choice
    from export.flux.weight_map import WEIGHTS_DIR
    from serving.flux_loop import FluxLoop, ort_callables

    def weight_inodes(generate_version: str) -> set[int]:
        version = json.loads((stack.repo / GENERATE.name / generate_version / "components.json").read_text())
        folder = stack.repo / FLUX_TRANSFORMER / str(version[FLUX_TRANSFORMER]) / WEIGHTS_DIR
        return {f.stat().st_ino for f in folder.iterdir()}

    # A patch: the untouched tensors are the very files the previous version serves (hard links),
    # the LoRA's layers are new files.
    new, old = weight_inodes(served.model_version), weight_inodes(previous.model_version)
    assert new & old and new - old
    components = json.loads((stack.repo / GENERATE.name / served.model_version / "components.json").read_text())

    full = tmp_path / "full"
    pipe = load_pipeline(provenance["checkpoint"], provenance["lora"], provenance["lora_scale"])
    export_all(pipe, full, only=[FLUX_TRANSFORMER])
    # When the CPU transformer serves int8, the full re-export is quantized by the same recipe
    # (export.flux.transformer_precision): like is compared with like.
    served_transformer = stack.repo / FLUX_TRANSFORMER / str(components[FLUX_TRANSFORMER])
    if (read_choice(served_transformer) or {}).get("served") == "int8":
        quantize_export(full / FLUX_TRANSFORMER, full / FLUX_TRANSFORMER / INT8_DIR)
        (full / FLUX_TRANSFORMER).rename(tmp_path / "full-fp32")
        (full / FLUX_TRANSFORMER).symlink_to(tmp_path / "full-fp32" / INT8_DIR)
    for name in UNCHANGED_BY_LORA:
        (full / name).symlink_to(stack.repo / name / str(components[name]))
    encode_clip, encode_t5, transformer, decode = ort_callables(full, 1)
    reexported_latents: list[np.ndarray] = []

    def decode_capturing(latent: np.ndarray, *args: np.ndarray) -> np.ndarray:
        reexported_latents.append(latent)
        return decode(latent, *args)

    seed, steps = 5, 4
    req = GenerateParams(
        prompt=SWAP_PROMPT, width=64, height=64, steps=steps, guidance=GENERATE_DEFAULTS.guidance, seed=seed
    )
    image = FluxLoop(provenance["checkpoint"], encode_clip, encode_t5, transformer, decode_capturing)(req)
    with TritonClient(stack.triton.grpc_url, timeout_s=300) as direct:
        served_image = direct.generate(
            GenerateParams(prompt=SWAP_PROMPT, seed=seed, width=64, height=64, steps=steps)
        ).image
    # The random-weight VAE maps most latents to nearly the same grey, so the image alone cannot
    # tell a right patch from a wrong one: the latents entering the decoder can.
    (served_latent,) = served_latents(stack.triton.grpc_url, stack.repo, served.model_version, SWAP_PROMPT, [seed])
    (previous_latent,) = served_latents(stack.triton.grpc_url, stack.repo, previous.model_version, SWAP_PROMPT, [seed])
    latent_error = float(np.abs(served_latent - reexported_latents[0]).max())
    lora_effect = float(np.abs(previous_latent - reexported_latents[0]).max())
    pixels = np.abs(served_image.astype(np.int16) - image.astype(np.int16))
    print(
        f"served patch vs full re-export: latent max abs {latent_error:.2e} (the LoRA scale change moves it "
        f"{lora_effect:.2e}); image max {pixels.max()}, mean {pixels.mean():.4f} of 255"
    )
    assert latent_error <= MAX_PATCH_LATENT_ERROR < lora_effect / 100
    assert pixels.max() <= 1
