"""docker-compose.yml renders for both profiles (`docker compose config`), and the rendered
services keep the deployment's promises: only the facade publishes a port, on loopback; Triton is
health-checked on /v2/health/ready and the facade waits for it; workers can be scaled; Redis gets
its password from the env file and persists to a volume; one model repository and one job folder
are shared; the adapter store is mounted where each service looks for it, in the mode it needs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from client.control_key import MIN_KEY_CHARS
from common.secret_strength import secret_problem
from tests.adapter_store_mounts import STORE_MODES, adapter_store_path, repository_path, workdir
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


def mounts(service: dict) -> dict[str, str]:
    """Mount target -> source, whichever form the compose CLI renders (v1 strings, v2 mappings)."""
    return {target: source for target, (source, _) in mount_modes(service).items()}


def mount_modes(service: dict) -> dict[str, tuple[str, str]]:
    """Mount target -> (source, "ro" or "rw")."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *options = v.split(":")
            read_only = "ro" in ",".join(options).split(",")
        else:
            source, target, read_only = v["source"], v["target"], bool(v.get("read_only"))
        out[target] = (source, "ro" if read_only else "rw")
    return out


def test_workers_scale_and_share_the_repository_and_job_folders(rendered: tuple[str, dict]) -> None:
    profile, config = rendered
    names = PROFILES[profile]
    services = _profile_services(profile, config)
    worker = services[names["worker"]]
    assert "container_name" not in worker and not worker.get("ports")  # `--scale worker=2` works

    for name in (names["api"], names["worker"], names["export"]):
        m = mounts(services[name])
        assert m["/app/model_repository"] == "models" and m["/app/build"] == "build", name
    assert mounts(services[names["triton"]])["/app/model_repository"] == "models"
    assert {"models", "build", "redis-data"} <= set(config["volumes"])


# ----------------------------------------------------------------------------- adapter store (issue 27)


def adapter_store_problems(profile: str, config: dict) -> list[str]:
    """What keeps the adapter store from working in the rendered `config`: a service that needs the
    store without the `adapters` volume at `adapters_dir` of its own repository path, or in the wrong
    mode; its repository not where the `models` volume is; the store mounted where it is not needed."""
    names = PROFILES[profile]
    services = _profile_services(profile, config)
    problems = []
    for role, mode in STORE_MODES.items():
        name = names[role]
        service = services[name]
        repo = repository_path(role, service["image"], service.get("environment") or {}, service.get("command"))
        mounted = mount_modes(service)
        if mounted.get(repo, ("", ""))[0] != "models":
            problems.append(f"{name}: its repository {repo} is not the `models` volume")
        store = adapter_store_path(repo)
        if store not in mounted:
            problems.append(f"{name}: no adapter store at {store}")
        elif mounted[store] != ("adapters", mode):
            problems.append(f"{name}: {store} is {mounted[store]}, not ('adapters', {mode!r})")
    for name, service in services.items():
        if name not in {names[role] for role in STORE_MODES}:
            if "adapters" in {source for source, _ in mount_modes(service).values()}:
                problems.append(f"{name}: mounts the adapter store it does not use")
    if "adapters" not in (config.get("volumes") or {}):
        problems.append("no `adapters` volume")
    return problems


def test_adapter_store_is_shared_where_each_service_looks_for_it(rendered: tuple[str, dict]) -> None:
    """The workers publish into the store (rw), the facade lists and deletes (rw), Triton's
    transformer reads it (ro); the export job and Redis never see it."""
    profile, config = rendered
    assert adapter_store_problems(profile, config) == []


@pytest.mark.parametrize(
    "breakage",
    ["worker unmounted", "api read-only", "triton read-write", "export mounted", "repository moved"],
)
def test_adapter_store_check_catches_a_broken_mount(rendered: tuple[str, dict], breakage: str) -> None:
    profile, config = rendered
    names = PROFILES[profile]
    broken = yaml.safe_load(yaml.safe_dump(config))
    services = broken["services"]

    def volumes(role: str) -> list:
        return services[names[role]].setdefault("volumes", [])

    def is_store(v: object) -> bool:
        return (v if isinstance(v, str) else v["source"]).startswith("adapters")

    def remount(role: str, read_only: bool) -> None:
        vols = volumes(role)
        store = next(v for v in vols if is_store(v))
        vols.remove(store)
        vols.append({"type": "volume", "source": "adapters", "target": "/app/adapters", "read_only": read_only})

    if breakage == "worker unmounted":
        services[names["worker"]]["volumes"] = [v for v in volumes("worker") if not is_store(v)]
    elif breakage == "api read-only":
        remount("api", True)
    elif breakage == "triton read-write":
        remount("triton", False)
    elif breakage == "export mounted":
        volumes("export").append("adapters:/app/adapters:rw")
    else:  # the worker told of another repository, its mounts left as they were
        services[names["worker"]].setdefault("environment", {})["FLUXSERVE_JOBS_MODEL_REPOSITORY"] = "/srv/repo"
    assert adapter_store_problems(profile, broken)


def test_app_image_owns_the_mount_points_of_the_writable_volumes(rendered: tuple[str, dict]) -> None:
    """An empty named volume takes the owner of the image's folder at its mount point; a folder the
    image lacks mounts root-owned, and the unprivileged workers could not publish into it."""
    profile, config = rendered
    dockerfile = (PROJECT_ROOT / "deploy" / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    chown = re.search(r"chown -R app:app ([^&;\n]+)", dockerfile)
    assert chown, "the runtime stage chowns no folder to the app user"
    root = workdir(PROJECT_ROOT / "deploy" / "docker" / "Dockerfile", "runtime")
    owned = {str(root / p) for p in chown.group(1).split()}
    names = PROFILES[profile]
    services = _profile_services(profile, config)
    for role in ("api", "worker", "export"):
        for target, (source, mode) in mount_modes(services[names[role]]).items():
            if mode == "rw" and source in config["volumes"]:
                assert target in owned, (names[role], target)


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
