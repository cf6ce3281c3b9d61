"""The launcher: python stubs run inside this interpreter's environment, whatever PATH the caller
had (an activated venv in a shell, or none under make/CI), and busy ports are refused."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from common.paths import BUILD_DIR
from runtime.launcher import TritonServer, TritonSettings, TritonStartError
from tests.conftest import PROJECT_ROOT, free_port

pytestmark = pytest.mark.integration

PROBE = """
import json, sys
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        import numpy, transformers, serving
        info = json.dumps({"prefix": sys.prefix, "numpy": numpy.__version__, "serving": serving.__file__})
        out = np.array([info.encode()], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("info", out)]) for _ in requests]
"""
CONFIG = 'name: "probe"\nbackend: "python"\nmax_batch_size: 0\ninput { name: "x" data_type: TYPE_FP32 dims: 1 }\noutput { name: "info" data_type: TYPE_STRING dims: 1 }\n'


def test_stub_runs_in_this_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tritonclient.grpc as g

    (tmp_path / "probe" / "1").mkdir(parents=True)
    (tmp_path / "probe" / "1" / "model.py").write_text(PROBE)
    (tmp_path / "probe" / "config.pbtxt").write_text(CONFIG)
    # As under make/CI: no venv on PATH, so the stub must not depend on the caller's shell.
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    settings = TritonSettings(
        model_repository=tmp_path,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_file=BUILD_DIR / "logs" / "test-probe.log",
    )
    with TritonServer(settings) as server:
        client = g.InferenceServerClient(server.grpc_url)
        x = g.InferInput("x", [1], "FP32")
        x.set_data_from_numpy(np.zeros(1, np.float32))
        info = json.loads(client.infer("probe", [x]).as_numpy("info")[0])
    assert os.path.realpath(info["prefix"]) == os.path.realpath(sys.prefix)
    assert info["numpy"] == np.__version__
    assert Path(info["serving"]).parent.parent == PROJECT_ROOT


def test_busy_port_is_refused(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = TritonSettings(
            model_repository=tmp_path, http_port=port, grpc_port=free_port(), metrics_port=free_port()
        )
        with pytest.raises(TritonStartError, match="already in use"):
            TritonServer(settings).start()


def test_triton_does_not_outlive_a_killed_launcher(tmp_path: Path) -> None:
    """A launcher killed outright (no chance to stop Triton) must not leave Triton holding ports."""
    import subprocess
    import time

    import psutil

    (tmp_path / "probe" / "1").mkdir(parents=True)
    (tmp_path / "probe" / "1" / "model.py").write_text(PROBE)
    (tmp_path / "probe" / "config.pbtxt").write_text(CONFIG)
    script = (
        "import os, signal, sys\n"
        "from runtime.launcher import TritonServer, TritonSettings\n"
        f"s = TritonSettings(model_repository={str(tmp_path)!r}, http_port={free_port()}, grpc_port={free_port()}, "
        f"metrics_port={free_port()})\n"
        "server = TritonServer(s).start()\n"
        "print(server.process.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=180)
    triton_pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 30
    while (
        time.monotonic() < deadline
        and psutil.pid_exists(triton_pid)
        and psutil.Process(triton_pid).status() != "zombie"
    ):
        time.sleep(0.2)
    assert not psutil.pid_exists(triton_pid) or psutil.Process(triton_pid).status() == "zombie"


def test_triton_log_on_standard_output(tmp_path: Path) -> None:
    """FLUXSERVE_TRITON_LOG_FILE=- (the container images): Triton's own log lines reach the
    launcher's standard output, where `docker logs` / `kubectl logs` read them."""
    import subprocess

    (tmp_path / "probe" / "1").mkdir(parents=True)
    (tmp_path / "probe" / "1" / "model.py").write_text(PROBE)
    (tmp_path / "probe" / "config.pbtxt").write_text(CONFIG)
    script = (
        "from runtime.launcher import TritonServer, TritonSettings\n"
        f"s = TritonSettings(model_repository={str(tmp_path)!r}, http_port={free_port()}, grpc_port={free_port()}, "
        f"metrics_port={free_port()})\n"
        "with TritonServer(s):\n"
        "    pass\n"
    )
    env = {**os.environ, "FLUXSERVE_TRITON_LOG_FILE": "-"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Started GRPCInferenceService" in proc.stdout, proc.stdout[-2000:]
    assert "successfully loaded 'probe'" in proc.stdout, proc.stdout[-2000:]
