"""Where each deployed service looks for the adapter store, for the static checks of the compose file
and the Kubernetes manifests (tests/unit/test_deploy_compose.py, tests/unit/test_deploy_k8s.py).

A service finds the store through its model repository (`common.adapter_store.adapters_dir`), and
each is told the repository its own way: the facade and the workers by FLUXSERVE_JOBS_MODEL_REPOSITORY
(the facade reads the job settings), the CPU Triton's launcher by FLUXSERVE_TRITON_MODEL_REPOSITORY,
a bare tritonserver by `--model-repository`; without any of them, the image's default. The checks
derive the store's path from those, so a deployment that moves the repository must move the store.
"""

from __future__ import annotations

import re
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from common.adapter_store import adapters_dir
from common.paths import MODEL_REPOSITORY
from tests.conftest import PROJECT_ROOT

DOCKER = PROJECT_ROOT / "deploy" / "docker"

STORE_MODES = {"api": "rw", "worker": "rw", "triton": "ro"}
"""The roles that use the store and how: the workers publish, the facade deletes, Triton only reads.
Every other service or container (the export job, Redis, the replica sync sidecar) mounts no store."""

REPOSITORY_ENV = {"api": "FLUXSERVE_JOBS_MODEL_REPOSITORY", "worker": "FLUXSERVE_JOBS_MODEL_REPOSITORY"}
TRITON_LAUNCHER_ENV = "FLUXSERVE_TRITON_MODEL_REPOSITORY"


def workdir(dockerfile: Path, stage: str | None = None) -> PurePosixPath:
    """The (last) WORKDIR of `stage` (or of the file, when it has one stage that sets it)."""
    current = None
    workdir: dict[str | None, str] = {}
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words and words[0].upper() == "FROM":
            current = words[3] if len(words) >= 4 and words[2].upper() == "AS" else None
        elif words and words[0].upper() == "WORKDIR":
            workdir[current] = words[1]
    return PurePosixPath(workdir[stage])


def _cmd_repository(command: str) -> str | None:
    match = re.search(r"--model-repository[= ](\S+)", command)
    return match.group(1) if match else None


def image_repositories() -> dict[str, str]:
    """Image name (no tag) -> the repository its processes use when nothing says otherwise."""
    app_default = str(workdir(DOCKER / "Dockerfile", "runtime") / MODEL_REPOSITORY.relative_to(PROJECT_ROOT))
    gpu = DOCKER / "Dockerfile.gpu"
    cmd = next(line for line in gpu.read_text().splitlines() if line.startswith("CMD "))
    gpu_default = _cmd_repository(cmd)
    assert gpu_default, "Dockerfile.gpu's CMD names no --model-repository"
    return {"fluxserve/app": app_default, "fluxserve/triton-cpu": app_default, "fluxserve/triton-gpu": gpu_default}


def repository_path(role: str, image: str, env: Mapping[str, str], command: Sequence[str] | str | None) -> str:
    """The model repository a container of `role` uses, from its environment, command and image."""
    if role in REPOSITORY_ENV and env.get(REPOSITORY_ENV[role]):
        return env[REPOSITORY_ENV[role]]
    if role == "triton":
        line = command if isinstance(command, str) else shlex.join(command or [])
        from_command = _cmd_repository(line)
        if from_command:
            return from_command
        if env.get(TRITON_LAUNCHER_ENV):
            return env[TRITON_LAUNCHER_ENV]
    return image_repositories()[image.rsplit(":", 1)[0]]


def adapter_store_path(repository: str) -> str:
    """`adapters_dir` of a container's repository path, worked out under an empty directory so that
    no symbolic link of this machine's file system bends the answer."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        store = adapters_dir(root / PurePosixPath(repository).relative_to("/"))
        return str(PurePosixPath("/") / store.relative_to(root).as_posix())
