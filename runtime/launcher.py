"""Run the real Triton Inference Server shipped in the `nvidia-pytriton` wheel.

The wheel carries `tritonserver` (Triton 2.51, python backend only). Two fixes make it work on a
plain Python install (verified on these machines):

* the python backend stub is copied into a project-owned backend directory beside
  `libtriton_python.so` (Triton looks for the stub next to the backend library), so we never
  write into site-packages;
* `LD_LIBRARY_PATH` points at this interpreter's LIBDIR, otherwise the stub links the system
  libpython and every python model fails to load, and at the wheel's `nvidia_pytriton.libs`,
  which the copied stub can no longer find through its relative RPATH.

The stub embeds CPython with PYTHONPATH ignored and finds its interpreter through PATH, so the
launcher puts this interpreter's bin directory first on PATH: the stub then runs inside the same
virtualenv as the launcher. model.py files import their logic from `serving/`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

import tritonclient.http as triton_http
from pydantic_settings import BaseSettings, SettingsConfigDict

from client.control_key import ControlKeyError, ensure_control_key, restricted_api_flags
from common.child_process import die_with_parent
from common.paths import BUILD_DIR, MODEL_REPOSITORY, PROJECT_ROOT
from contract.specs import ENDPOINTS
from publish.publish_journal import recover_repository

log = logging.getLogger(__name__)


class TritonSettings(BaseSettings):
    """Knobs for the Triton process. Environment prefix: FLUXSERVE_TRITON_."""

    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_TRITON_")

    host: str = ENDPOINTS.host
    http_port: int = ENDPOINTS.triton_http_port
    grpc_port: int = ENDPOINTS.triton_grpc_port
    metrics_port: int = ENDPOINTS.triton_metrics_port
    model_repository: Path = MODEL_REPOSITORY
    backend_dir: Path = BUILD_DIR / "triton_backends"
    log_file: Path | None = None
    """Triton's own log; "-": the launcher's stdout (containers, where `docker logs` must show it)."""
    startup_timeout_s: float = 180.0
    exit_timeout_s: int = 30
    """How long Triton drains on SIGINT/SIGTERM before it exits anyway (`--exit-timeout-secs`): in-flight
    requests finish within it. A model instance whose stub died never reports unloaded, so a stop
    after a stub death always waits this long."""
    log_verbose: int = 0
    models: tuple[str, ...] = ("*",)
    """Models loaded at start (explicit control mode); "*" loads every model in the repository."""


class TritonStartError(RuntimeError):
    """Triton exited or did not become ready; the message carries Triton's own error lines."""


def _pytriton_server_dir() -> Path:
    import pytriton  # imported lazily: only the launcher needs the wheel's files

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def prepare_backend_dir(backend_dir: Path) -> Path:
    """Create `<backend_dir>/python/` with the backend library and this Python's stub."""
    server_dir = _pytriton_server_dir()
    py_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / py_version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonStartError(f"the pytriton wheel has no python backend stub for Python {py_version}")
    target = backend_dir / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in [*(server_dir / "backends" / "python").iterdir(), stub]:
        if src.is_file():
            dst = target / src.name
            if not dst.exists() or dst.stat().st_size != src.stat().st_size:
                shutil.copy2(src, dst)
    return backend_dir


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver so that its python stubs see this interpreter and project."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    # The copied stub's RPATH ($ORIGIN-relative) no longer reaches the wheel's vendored libs.
    vendored = str(_pytriton_server_dir().parent.parent / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, vendored, env.get("LD_LIBRARY_PATH", "")) if p)
    # The stub embeds CPython without setting a program name, so CPython finds `python3` on PATH
    # and takes its prefix from it: with this interpreter's bin dir first, a venv's pyvenv.cfg is
    # found and the stub sees exactly this environment (numpy<2 and all), not the system Python.
    # PYTHONPATH is ignored by the stub (-E semantics); the editable install makes the project
    # importable, and the project root is the stub's working directory as a fallback.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # The server has no hub access by design; make that explicit to every library inside it.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Each model instance is its own stub process; unbounded BLAS threads would oversubscribe.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def exported_models(repo: Path) -> list[str]:
    """Models with a generated config. A folder holding only its committed model.py source has
    not been exported yet, and asking Triton to load it would abort start-up."""
    return sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))


def build_command(settings: TritonSettings, backend_dir: Path, control_key: str) -> list[str]:
    """tritonserver's command line; model control and configs need `control_key` (client.control_key)."""
    binary = _pytriton_server_dir() / "bin" / "tritonserver"
    cmd = [
        str(binary),
        f"--model-repository={settings.model_repository}",
        f"--backend-directory={backend_dir}",
        "--model-control-mode=explicit",
        f"--http-address={settings.host}",
        f"--http-port={settings.http_port}",
        f"--grpc-address={settings.host}",
        f"--grpc-port={settings.grpc_port}",
        f"--metrics-address={settings.host}",
        f"--metrics-port={settings.metrics_port}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        "--exit-on-error=true",
        "--strict-readiness=true",
        f"--exit-timeout-secs={settings.exit_timeout_s}",
        f"--log-verbose={settings.log_verbose}",
        *restricted_api_flags(control_key),
    ]
    models = exported_models(settings.model_repository) if settings.models == ("*",) else list(settings.models)
    if not models:
        raise TritonStartError(f"no exported models in {settings.model_repository}: run `make models`")
    cmd += [f"--load-model={m}" for m in models]
    return cmd


def _error_lines(log_text: str, limit: int = 12) -> str:
    """Triton's own error lines (E-prefixed glog lines and load failures), newest last."""
    lines = [
        ln
        for ln in log_text.splitlines()
        if ln.startswith("E") or "failed to load" in ln or "UNAVAILABLE" in ln or "Error" in ln
    ]
    return "\n".join(lines[-limit:]) or "\n".join(log_text.splitlines()[-limit:])


def recover_committed_set(repo: Path) -> None:
    """Serve exactly the last committed set: undo what a publisher that died mid-publish left.

    Where this Triton only reads the repository (a read-only volume, as in docker compose and
    Kubernetes), the publishers own that clean-up: each publish rolls back a dead one's leftovers
    first, and the workers' housekeeping rolls back a reaped publisher's versions and reloads
    them in Triton (publish.hot_swap.recover_and_reload)."""
    try:
        recover_repository(repo)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        log.info("model repository %s is read-only here (%s): the publishers roll back interrupted publishes", repo, e)


class TritonServer:
    """A tritonserver subprocess: start, wait until ready, stop cleanly (models load through
    publish.model_control)."""

    def __init__(self, settings: TritonSettings | None = None) -> None:
        self.settings = settings or TritonSettings()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.settings.log_file or (BUILD_DIR / "logs" / f"triton-{self.settings.grpc_port}.log")

    @property
    def http_url(self) -> str:
        return f"{self.settings.host}:{self.settings.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.settings.host}:{self.settings.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.metrics_port}/metrics"

    @property
    def logs_to_stdout(self) -> bool:
        return str(self.log_path) == "-"

    def log_text(self) -> str:
        if self.logs_to_stdout:
            return "(Triton's log is on standard output, above)"
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _check_ports_free(self) -> None:
        """A server already on our ports would answer our readiness probe in Triton's place."""
        s = self.settings
        for port in (s.http_port, s.grpc_port, s.metrics_port):
            with socket.socket() as sock:
                # As servers bind: a port with only TIME_WAIT connections left by a server that
                # just died (a supervised restart) is free; one with a listener is not.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((s.host, port))
                except OSError as e:
                    raise TritonStartError(f"port {s.host}:{port} is already in use (another Triton?): {e}") from e

    def start(self) -> TritonServer:
        self._check_ports_free()
        recover_committed_set(self.settings.model_repository)
        backend_dir = prepare_backend_dir(self.settings.backend_dir)
        try:
            key = ensure_control_key()
        except ControlKeyError as e:
            raise TritonStartError(str(e)) from e
        cmd = build_command(self.settings, backend_dir, key)
        log.info("starting Triton: %s", " ".join(cmd).replace(key, "<control key>"))
        if self.logs_to_stdout:
            log_fh = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log_fh = self.log_path.open("wb")
        # New session: Ctrl-C in `make up` reaches us, and we stop Triton in order.
        self.process = subprocess.Popen(
            cmd,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            env=server_environment(),
            start_new_session=True,
            cwd=PROJECT_ROOT,
            preexec_fn=die_with_parent,
        )
        log_fh.close()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        client = triton_http.InferenceServerClient(self.http_url, connection_timeout=2.0, network_timeout=5.0)
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise TritonStartError(
                        f"tritonserver exited with code {self.process.returncode}:\n{_error_lines(self.log_text())}"
                    )
                try:
                    if client.is_server_ready():
                        log.info("Triton ready at grpc=%s http=%s", self.grpc_url, self.http_url)
                        return
                except Exception:  # connection refused while it starts: keep polling
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        self.stop()
        raise TritonStartError(
            f"Triton not ready after {self.settings.startup_timeout_s:.0f}s:\n{_error_lines(self.log_text())}"
        )

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGINT, then SIGKILL if Triton has not exited `timeout_s` (default: its own exit timeout
        and a margin for the stubs) later."""
        timeout_s = self.settings.exit_timeout_s + 10.0 if timeout_s is None else timeout_s
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # Triton drains in-flight requests on SIGINT/SIGTERM
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("Triton did not stop in %.0fs; killing it", timeout_s)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`fluxserve-triton`: run Triton in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path)
    parser.add_argument("--models", nargs="*", help="models to load (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, object] = {}
    if args.model_repository:
        overrides["model_repository"] = args.model_repository
    if args.models:
        overrides["models"] = tuple(args.models)
    server = TritonServer(TritonSettings(**overrides))
    try:
        server.start()
    except TritonStartError as e:
        log.error("%s", e)
        return 1
    stop = False

    def _handle(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)
    while not stop and server.process is not None and server.process.poll() is None:
        time.sleep(0.5)
    code = server.process.returncode if server.process is not None else 0
    server.stop()
    return 0 if stop else (code or 1)


if __name__ == "__main__":
    sys.exit(main())
