"""The repository-sync sidecar against a real Triton: a version published into the shared
repository by someone else (another replica's worker) is loaded into this Triton, components
before pipelines, and a failed load is retried on the next poll."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.paths import BUILD_DIR
from contract.specs import CLASSIFY, GENERATE
from publish.model_control import ready_versions
from runtime.repository_sync import SyncSettings, changed_models, snapshot, sync_once
from tests.conftest import free_port

pytestmark = pytest.mark.integration

MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.version = int(args["model_version"])

    def execute(self, requests):
        out = np.array([self.version], dtype=np.int32)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("version", out)]) for _ in requests]
"""
CONFIG = (
    'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\nversion_policy {{ latest {{ num_versions: 1 }} }}\n'
    'input {{ name: "x" data_type: TYPE_FP32 dims: 1 }}\noutput {{ name: "version" data_type: TYPE_INT32 dims: 1 }}\n'
)


def publish_version(repo: Path, name: str, version: int) -> None:
    """As publish/repository.py does: assemble in a hidden staging folder, then rename into place."""
    staging = repo / name / f".staging-{version}"
    staging.mkdir(parents=True)
    (staging / "model.py").write_text(MODEL)
    os.rename(staging, repo / name / str(version))


def served_version(grpc_url: str, name: str) -> int:
    import tritonclient.grpc as g

    client = g.InferenceServerClient(grpc_url)
    x = g.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.zeros(1, np.float32))
    try:
        return int(client.infer(name, [x]).as_numpy("version")[0])
    finally:
        client.close()


def test_pipelines_load_after_components() -> None:
    before = {"a": ((1,), 1), GENERATE.name: ((1,), 1), CLASSIFY.name: ((1,), 1)}
    now = {GENERATE.name: ((1, 2), 1), "flux_transformer": ((1, 2), 1), CLASSIFY.name: ((1, 2), 1), "a": ((1,), 1)}
    assert changed_models(before, now) == ["flux_transformer", CLASSIFY.name, GENERATE.name]


def test_new_version_in_shared_repository_reaches_this_triton(tmp_path: Path) -> None:
    from runtime.launcher import TritonServer, TritonSettings

    repo = tmp_path / "repo"
    for name in ("component", GENERATE.name):
        (repo / name).mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name))
        publish_version(repo, name, 1)
    settings = TritonSettings(
        model_repository=repo,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_file=BUILD_DIR / "logs" / "test-repository-sync.log",
    )
    with TritonServer(settings) as server:
        sync = SyncSettings(model_repository=repo, triton_http_url=server.http_url)
        state = snapshot(repo)
        assert sync_once(sync, state) == state  # nothing changed: nothing loaded

        publish_version(repo, "component", 2)
        publish_version(repo, GENERATE.name, 2)
        state = sync_once(sync, state)
        assert served_version(server.grpc_url, "component") == 2
        assert served_version(server.grpc_url, GENERATE.name) == 2
        assert ready_versions(server.http_url, GENERATE.name) == ["2"]
        assert state == snapshot(repo)

        # A version Triton refuses (its model.py does not import) is not marked done: the pipeline
        # is not loaded past it, and the next poll retries once the folder is fixed.
        publish_version(repo, "component", 3)
        (repo / "component" / "3" / "model.py").write_text("raise ImportError('broken on purpose')\n")
        publish_version(repo, GENERATE.name, 3)
        after_failure = sync_once(sync, state)
        assert after_failure["component"] == state["component"]
        assert after_failure[GENERATE.name] == state[GENERATE.name]
        assert served_version(server.grpc_url, GENERATE.name) == 2

        shutil.rmtree(repo / "component" / "3")
        publish_version(repo, "component", 4)
        final = sync_once(sync, after_failure)
        assert served_version(server.grpc_url, "component") == 4
        assert served_version(server.grpc_url, GENERATE.name) == 3
        assert final == snapshot(repo)
