"""Crash-safe, exclusive publishing into a live Triton (real Triton on a copy of the built
repository, real publisher processes running publish.hot_swap.publish_and_load, the code path a
training job's publish step runs).

* A publisher killed with SIGKILL after writing its versions (before they load and commit)
  leaves the old versions serving after Triton restarts, no leftover version folder, and the
  config.pbtxt it changed restored.
* Two publishers at once both succeed with distinct versions, and neither deletes the other's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.triton_client import TritonClient
from common.paths import BUILD_DIR
from publish.model_control import ready_versions
from publish.publish_journal import JOURNAL
from publish.repository import MANIFEST, versions
from tests.conftest import MODEL_REPOSITORY, PROJECT_ROOT, require_models, start_facade, start_triton
from tests.integration.test_job_liveness import LIVENESS_ENV, wait_job
from tests.small_classifier_data import small_classifier_env
from training.worker import running_worker

pytestmark = pytest.mark.integration

MODELS = ("classifier_onnx", "classify")

# Publishes new versions of both classifier models made of the serving version's files, with a
# changed classify config (an extra parameter), then loads them: in "hang" mode it stops after
# writing (the crash point: versions on disk, not yet loaded or committed).
PUBLISHER = """
import json, sys, time
from dataclasses import replace
from pathlib import Path
from export.deployments import classifier_deployments
from publish.hot_swap import publish_and_load
from publish.repository import MANIFEST, publish, versions

repo, url, tag, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

def publish_fn():
    deps, out = classifier_deployments(), {}
    for name in ("classifier_onnx", "classify"):
        dep = deps[name]
        if name == "classify":
            dep = replace(dep, parameters={**dep.parameters, "test_publisher": tag})
        latest = repo / name / str(versions(repo, name)[-1])
        files = {p.name: p for p in latest.iterdir() if p.name not in ("model.py", MANIFEST)}
        out[name] = publish(repo, dep, "cpu", files, {"test_publisher": tag}).version
    if mode == "hang":
        print("written " + json.dumps(out), flush=True)
        time.sleep(600)
    return out

print(json.dumps(publish_and_load(repo, url, ["classifier_onnx", "classify"], publish_fn, keep_versions=10)), flush=True)
"""


def publisher(repo: Path, triton_http_url: str, tag: str, mode: str = "complete") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(repo), triton_http_url, tag, mode],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def leftovers(repo: Path) -> list[str]:
    return sorted(
        str(p.relative_to(repo))
        for name in MODELS
        for p in (repo / name).iterdir()
        if p.name == JOURNAL or p.name.startswith(".staging")
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    require_models(*MODELS)
    root = tmp_path_factory.mktemp("publish-safety") / "repo"
    root.mkdir()
    for name in MODELS:  # hard links: publishing only adds files or replaces them by rename
        shutil.copytree(MODEL_REPOSITORY / name, root / name, copy_function=os.link)
    return root


@pytest.fixture(scope="module")
def triton(repo: Path):
    server = start_triton(repo, models=MODELS, log_name="test-triton-publish-safety.log")
    yield server
    server.stop()


def test_two_concurrent_publishes_both_end_consistent(repo: Path, triton) -> None:
    before = {m: versions(repo, m) for m in MODELS}
    procs = {tag: publisher(repo, triton.http_url, tag) for tag in ("alpha", "beta")}
    results = {}
    for tag, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results[tag] = json.loads(out.strip().splitlines()[-1])
    for name in MODELS:
        got = sorted(results[tag][name] for tag in results)
        assert got[0] != got[1] and got[0] > before[name][-1], (name, results)  # distinct, both new
        assert versions(repo, name) == [*before[name], *got]  # neither deleted the other's version
        for tag in results:  # each version holds its own publisher's files, complete
            manifest = json.loads((repo / name / str(results[tag][name]) / MANIFEST).read_text())
            assert manifest["provenance"] == {"test_publisher": tag}
            assert all((repo / name / str(results[tag][name]) / rel).is_file() for rel in manifest["files"])
    assert leftovers(repo) == []
    newest = str(max(r["classify"] for r in results.values()))
    assert newest in ready_versions(triton.http_url, "classify")


def _forget_serving_accuracy(repo: Path, version: str) -> None:
    """This test's one-epoch job must reach its publish step, so the accuracy gate (publish only what
    beats the serving classifier, tested in test_training_api) must let it through: the copy's
    serving manifest loses its recorded accuracy. The copy's files are hard links to the built
    repository's: write a new file, never into the shared one."""
    path = repo / "classify" / version / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.get("report", {}).pop("test_accuracy", None)
    manifest.get("provenance", {}).pop("classifier", None)
    path.unlink()
    path.write_text(json.dumps(manifest))


def test_a_worker_killed_while_publishing_its_job(repo: Path, triton, tmp_path: Path) -> None:
    """A classifier job through the real facade and worker, killed with SIGKILL during its publish
    step: cancel answered 409 meanwhile, the job ends failed (worker lost), its uncommitted
    versions are rolled back by the reaper and the old version serves on."""
    before = {m: versions(repo, m) for m in MODELS}
    serving = ready_versions(triton.http_url, "classify")
    _forget_serving_accuracy(repo, serving[-1])
    env = {
        "FLUXSERVE_JOBS_JOBS_DIR": str(tmp_path / "jobs"),
        "FLUXSERVE_JOBS_MODEL_REPOSITORY": str(repo),
        "FLUXSERVE_JOBS_TRITON_HTTP_URL": triton.http_url,
        **small_classifier_env(tmp_path),
        **LIVENESS_ENV,
    }
    facade = start_facade(triton.grpc_url, env)
    try:
        with facade.client() as http:
            with running_worker(env, BUILD_DIR / "logs" / "test-publish-worker.log") as worker:
                r = http.post("/train", data={"kind": "classifier", "steps": "1", "seed": "0"})
                assert r.status_code == 202, r.text
                job_id = r.json()["job_id"]
                job = wait_job(
                    http,
                    job_id,
                    lambda j: j["phase"] == "publishing" or j["status"] != "running" and j["status"] != "queued",
                )
                assert (job["status"], job["phase"]) == ("running", "publishing"), job
                refused = http.delete(f"/train/{job_id}")
                assert refused.status_code == 409 and "publishing" in refused.json()["error"]["message"]
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait(30)
            failed = wait_job(http, job_id, lambda j: j["status"] != "running", timeout_s=120)
        assert failed["status"] == "failed" and "worker lost" in failed["error"], failed
        deadline = time.monotonic() + 60
        while leftovers(repo):  # the facade's reaper rolls the interrupted publish back
            assert time.monotonic() < deadline, leftovers(repo)
            time.sleep(0.2)
        assert {m: versions(repo, m) for m in MODELS} == before
        assert ready_versions(triton.http_url, "classify") == serving
    finally:
        facade.stop()


def test_a_publisher_killed_mid_publish_leaves_the_old_version_after_restart(repo: Path, triton) -> None:
    before = {m: versions(repo, m) for m in MODELS}
    config_before = (repo / "classify" / "config.pbtxt").read_text()
    serving = ready_versions(triton.http_url, "classify")

    proc = publisher(repo, triton.http_url, "crashed", mode="hang")
    try:
        line = proc.stdout.readline()
        assert line.startswith("written"), proc.stderr.read()[-3000:] if proc.poll() is not None else line
        written = json.loads(line.split(" ", 1)[1])
        # The crash point: its versions and its config change are in the live repository.
        assert all(versions(repo, m)[-1] == written[m] for m in MODELS)
        assert "test_publisher" in (repo / "classify" / "config.pbtxt").read_text()
        assert leftovers(repo) == sorted(f"{m}/{JOURNAL}" for m in MODELS)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)

    triton.stop()
    # A new Triton on the same repository: the launcher rolls the uncommitted publish back first.
    restarted = start_triton(repo, models=MODELS, log_name="test-triton-publish-safety-restart.log")
    try:
        assert {m: versions(repo, m) for m in MODELS} == before
        assert (repo / "classify" / "config.pbtxt").read_text() == config_before
        assert leftovers(repo) == []
        assert ready_versions(restarted.http_url, "classify") == serving
        with TritonClient(restarted.grpc_url, timeout_s=120) as client:
            (result,) = client.classify(["make an image of a cat"])
        assert result.label
    finally:
        restarted.stop()
