"""Triton's model-control and model-config APIs need the control key; inference does not.

Attacks from issue 26, item 1, against a real Triton started by the launcher: an anonymous
repository index and config read, and an anonymous load with a `config` and a `file:1/model.py`
override (code execution inside Triton), sent as JSON and as `text/plain` (what any web page may
send cross-origin without a preflight), on HTTP and gRPC. The publishers' own calls, which send
the key, keep working.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException

from client.control_key import CONTROL_KEY_HEADER, GRPC_CONTROL_KEY_HEADER, control_headers, control_key
from publish.model_control import load_models, ready_versions
from runtime.launcher import TritonServer
from tests.conftest import start_triton

pytestmark = pytest.mark.integration

ECHO = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
            for r in requests
        ]
"""
CONFIG = (
    'backend: "python"\nmax_batch_size: 0\n'
    'input { name: "x" data_type: TYPE_FP32 dims: 1 }\noutput { name: "y" data_type: TYPE_FP32 dims: 1 }\n'
)
EVIL = "import pathlib\nclass TritonPythonModel:\n    def initialize(self, args):\n        pathlib.Path({marker!r}).write_text('owned')\n    def execute(self, requests):\n        return []\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[TritonServer]:
    repo: Path = tmp_path_factory.mktemp("repo")
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "1" / "model.py").write_text(ECHO)
    (repo / "echo" / "config.pbtxt").write_text('name: "echo"\n' + CONFIG)
    server = start_triton(repo, log_name="test-triton-control")
    yield server
    server.stop()


def evil_load_body(marker: Path) -> dict:
    source = EVIL.format(marker=str(marker)).encode()
    return {
        "parameters": {
            "config": json.dumps({"name": "evil", "backend": "python", "max_batch_size": 0}),
            "file:1/model.py": base64.b64encode(source).decode(),
        }
    }


def test_anonymous_http_control_is_refused(server: TritonServer, tmp_path: Path) -> None:
    base = f"http://{server.http_url}"
    marker = tmp_path / "owned"
    body = json.dumps(evil_load_body(marker))
    answers = [
        httpx.post(f"{base}/v2/repository/index", timeout=10),
        httpx.get(f"{base}/v2/models/echo/config", timeout=10),
        httpx.post(f"{base}/v2/repository/models/evil/load", content=body, timeout=30),
        # A cross-origin page may POST text/plain without a preflight: same refusal.
        httpx.post(
            f"{base}/v2/repository/models/evil/load", content=body, headers={"Content-Type": "text/plain"}, timeout=30
        ),
        httpx.post(f"{base}/v2/repository/models/echo/unload", timeout=10),
        # A wrong key is no key.
        httpx.post(f"{base}/v2/repository/index", headers={CONTROL_KEY_HEADER: "x" * 32}, timeout=10),
    ]
    assert [r.status_code for r in answers] == [403] * len(answers), [r.text for r in answers]
    assert not marker.exists()
    assert httpx.get(f"{base}/v2/models/echo/ready", timeout=10).status_code == 200  # not unloaded
    assert httpx.get(f"{base}/v2/models/evil/ready", timeout=10).status_code != 200


def test_anonymous_grpc_control_is_refused(server: TritonServer, tmp_path: Path) -> None:
    client = g.InferenceServerClient(server.grpc_url)
    marker = tmp_path / "owned"
    params = evil_load_body(marker)["parameters"]
    calls = [
        lambda: client.get_model_repository_index(),
        lambda: client.get_model_config("echo"),
        lambda: client.load_model("evil", config=params["config"], files={"file:1/model.py": EVIL.encode()}),
        lambda: client.unload_model("echo"),
        lambda: client.get_model_repository_index(headers={GRPC_CONTROL_KEY_HEADER: "x" * 32}),
        # The HTTP header name is not the gRPC one: a right key under it is refused too.
        lambda: client.get_model_repository_index(headers=control_headers()),
    ]
    for call in calls:
        with pytest.raises(InferenceServerException, match="(?i)permission|unavailable|denied|restricted"):
            call()
    assert not marker.exists()
    assert client.is_model_ready("echo")


def test_inference_and_health_stay_open(server: TritonServer) -> None:
    client = g.InferenceServerClient(server.grpc_url)
    x = g.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.array([3.0], np.float32))
    assert client.infer("echo", [x]).as_numpy("y").tolist() == [3.0]
    assert client.is_server_ready() and client.get_model_metadata("echo").name == "echo"
    base = f"http://{server.http_url}"
    r = httpx.post(
        f"{base}/v2/models/echo/infer",
        json={"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [2.0]}]},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.0]
    assert httpx.get(f"{base}/v2/models/echo/stats", timeout=10).status_code == 200


def test_publishers_with_the_key_keep_working(server: TritonServer) -> None:
    load_models(server.http_url, ["echo"])  # what every publisher and the sync sidecar call
    assert ready_versions(server.http_url, "echo") == ["1"]
    config = g.InferenceServerClient(server.grpc_url).get_model_config("echo", headers=control_headers(grpc=True))
    assert config.config.name == "echo"


def test_key_never_in_logs(server: TritonServer) -> None:
    key = control_key()
    assert key and key not in server.log_text()
