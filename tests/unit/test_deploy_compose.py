"""docker-compose.yml renders for both profiles (`docker compose config`), and the rendered
services keep the deployment's promises: only the facade publishes a port, on loopback; Triton is
health-checked on /v2/health/ready and the facade waits for it; workers can be scaled; Redis gets
its password from the env file and persists to a volume; one model repository and one job folder
are shared."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from client.control_key import MIN_KEY_CHARS
from common.secret_strength import secret_problem
from tests.conftest import PROJECT_ROOT

EXAMPLE_ENV = PROJECT_ROOT / "deploy" / "compose" / "env.example"
MAKE_ENV = PROJECT_ROOT / "deploy" / "compose" / "make_env.sh"
PROFILES = {
    "cpu": {"triton": "triton", "api": "api", "worker": "worker", "export": "export"},
    "gpu": {"triton": "triton-gpu", "api": "api-gpu", "worker": "worker-gpu", "export": "export-gpu"},
}


def compose_command() -> list[str]:
    """`docker compose` (v2 plugin) or Debian's `docker-compose`; .ci/run installs the latter."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.skip("no Docker Compose CLI installed (`apt-get install docker-compose` gives one; .ci/run does it)")


def env_file_with_random_secrets(path: Path) -> Path:
    """What an operator writes: `deploy/compose/make_env.sh > fluxserve.env`."""
    result = subprocess.run(["bash", str(MAKE_ENV)], capture_output=True, text=True, check=True)
    path.write_text(result.stdout)
    return path


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return env_file_with_random_secrets(tmp_path_factory.mktemp("compose") / "fluxserve.env")


def compose_config(profile: str, env_file: Path) -> subprocess.CompletedProcess:
    cmd = [
        *compose_command(),
        "--project-directory",
        str(PROJECT_ROOT),
        "-f",
        str(PROJECT_ROOT / "docker-compose.yml"),
        "--env-file",
        str(env_file),
        "--profile",
        profile,
        "config",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT)


def render(profile: str, env_file: Path) -> dict:
    result = compose_config(profile, env_file)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module", params=sorted(PROFILES))
def rendered(request: pytest.FixtureRequest, env_file: Path) -> tuple[str, dict]:
    return request.param, render(request.param, env_file)


def _profile_services(profile: str, config: dict) -> dict[str, dict]:
    # Compose v1 prints every service; v2 only the active profile's. Keep the profile's ones.
    return {n: s for n, s in config["services"].items() if profile in s.get("profiles", [profile])}


def _published(service: dict) -> list[str]:
    out = []
    for p in service.get("ports", []):
        out.append(p if isinstance(p, str) else f"{p.get('host_ip', '')}:{p.get('published')}:{p.get('target')}")
    return out


def test_only_the_facade_publishes_a_port_on_loopback(rendered: tuple[str, dict]) -> None:
    profile, config = rendered
    services = _profile_services(profile, config)
    api = PROFILES[profile]["api"]
    publishing = {n for n, s in services.items() if s.get("ports")}
    assert publishing == {api}
    assert all(p.startswith("127.0.0.1:") and p.split(":")[2].startswith("8080") for p in _published(services[api]))


def test_triton_is_health_checked_and_awaited(rendered: tuple[str, dict]) -> None:
    profile, config = rendered
    names = PROFILES[profile]
    services = _profile_services(profile, config)
    triton = services[names["triton"]]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert triton["restart"] == "always"
    for dependent in (names["api"], names["worker"]):
        assert services[dependent]["depends_on"][names["triton"]]["condition"] == "service_healthy"
        assert services[dependent]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert triton["depends_on"][names["export"]]["condition"] == "service_completed_successfully"
    # The facade and workers find Triton by the same name in both profiles.
    if names["triton"] != "triton":
        assert "triton" in triton["networks"]["default"]["aliases"]


def test_workers_scale_and_share_the_repository_and_job_folders(rendered: tuple[str, dict]) -> None:
    profile, config = rendered
    names = PROFILES[profile]
    services = _profile_services(profile, config)
    worker = services[names["worker"]]
    assert "container_name" not in worker and not worker.get("ports")  # `--scale worker=2` works

    def mounts(service: dict) -> dict[str, str]:
        out = {}
        for v in service.get("volumes", []):
            source, target = v.split(":")[:2] if isinstance(v, str) else (v["source"], v["target"])
            out[target] = source
        return out

    for name in (names["api"], names["worker"], names["export"]):
        m = mounts(services[name])
        assert m["/app/model_repository"] == "models" and m["/app/build"] == "build", name
    assert mounts(services[names["triton"]])["/app/model_repository"] == "models"
    assert {"models", "build", "redis-data"} <= set(config["volumes"])


def test_containers_have_read_only_root_filesystems(rendered: tuple[str, dict]) -> None:
    profile, config = rendered
    for name, service in _profile_services(profile, config).items():
        if name.startswith("triton") and profile == "gpu":
            continue  # NVIDIA's image writes beside its binaries; not run here, so not claimed
        assert service.get("read_only") is True, name


def test_redis_password_comes_from_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "fluxserve.env"
    env_file.write_text(
        "REDIS_PASSWORD=s3cret-from-file\nFLUXSERVE_QUEUE_SECRET=q-secret\nFLUXSERVE_API_KEYS=op:0123456789abcdef\n"
        "FLUXSERVE_TRITON_CONTROL_KEY=k0123456789abcdef0123456789\n"
    )
    services = render("cpu", env_file)["services"]
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == "s3cret-from-file"
    assert services["api"]["environment"]["FLUXSERVE_JOBS_REDIS_URL"] == "redis://:s3cret-from-file@redis:6379/0"
    assert "s3cret" not in " ".join(services["redis"].get("entrypoint", []))  # not on a command line
    assert any(
        str(v).startswith("redis-data:") or (isinstance(v, dict) and v.get("source") == "redis-data")
        for v in services["redis"]["volumes"]
    )


def test_gpu_profile_reserves_nvidia_gpus(env_file: Path) -> None:
    services = render("gpu", env_file)["services"]
    for name in ("triton-gpu", "export-gpu", "worker-gpu"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
    assert "--target" in services["export-gpu"]["command"] and "gpu" in services["export-gpu"]["command"]


# ----------------------------------------------------------------------------- secrets (issue 26 item 2)


def _assignments(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def test_example_env_file_holds_no_usable_value() -> None:
    variables = _assignments(EXAMPLE_ENV.read_text())
    assert set(variables) >= {"REDIS_PASSWORD", "FLUXSERVE_QUEUE_SECRET", "FLUXSERVE_API_KEYS"}
    assert "FLUXSERVE_TRITON_CONTROL_KEY" in variables
    assert all(value == "" for value in variables.values()), variables


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_example_env_file_copied_unchanged_refuses_to_start_naming_the_variable(tmp_path: Path, profile: str) -> None:
    copied = tmp_path / "fluxserve.env"
    copied.write_text(EXAMPLE_ENV.read_text())
    result = compose_config(profile, copied)
    assert result.returncode != 0
    assert re.search(r"set (REDIS_PASSWORD|FLUXSERVE_\w+) in the env file", result.stderr), result.stderr


def test_make_env_fills_every_variable_with_a_strong_secret(env_file: Path) -> None:
    made = _assignments(env_file.read_text())
    assert set(made) == set(_assignments(EXAMPLE_ENV.read_text()))
    for name, value in made.items():
        secret = value.split(":", 1)[1] if name == "FLUXSERVE_API_KEYS" else value
        assert secret_problem(secret, MIN_KEY_CHARS) is None, name
    assert made["FLUXSERVE_API_KEYS"].startswith("operator:")
    assert len(set(made.values())) == len(made)  # one value per secret, never shared


def test_only_the_facade_gets_the_operator_keys(rendered: tuple[str, dict], env_file: Path) -> None:
    profile, config = rendered
    names = PROFILES[profile]
    services = _profile_services(profile, config)
    api_env = services[names["api"]]["environment"]
    assert api_env["FLUXSERVE_API_KEYS"] == _assignments(env_file.read_text())["FLUXSERVE_API_KEYS"]
    # The facade keeps the shared settings (its env map merges the app's).
    assert {"FLUXSERVE_JOBS_REDIS_URL", "FLUXSERVE_JOBS_QUEUE_SECRET", "FLUXSERVE_TRITON_CONTROL_KEY"} <= set(api_env)
    for name in (names["worker"], names["export"], names["triton"], "redis"):
        assert "FLUXSERVE_API_KEYS" not in (services[name].get("environment") or {}), name


def test_facade_answers_its_service_names_and_loopback(rendered: tuple[str, dict]) -> None:
    profile, config = rendered
    allowed = _profile_services(profile, config)[PROFILES[profile]["api"]]["environment"]
    hosts = set(allowed["FLUXSERVE_API_ALLOWED_HOSTS"].split(","))
    assert {"127.0.0.1", "localhost", "[::1]", PROFILES[profile]["api"]} <= hosts
