"""`python -m benchmarks.gpu_kit`: the wheels a lent GPU machine needs for `python -m benchmarks.gpu`.

Such a machine has Python 3.12 with CUDA torch; nothing can be downloaded there, and a call carries
at most 64 MiB. The kit is this machine's versions of what the GPU path needs
(GPU_PATH_ROOTS and their declared dependencies, less torch's), downloaded as cp312 manylinux wheels, minus what the GPU machine already
has at a usable version (its `pip list --format=freeze`, saved by a first short call), with the
pytriton wheel slimmed to the one Python it will serve (the other versions' stubs and the libpython
3.13 it bundles for one of them: 16 MB of its 55), split into parts that each fit one call's carry.
Ignored build outputs stay on a warm machine between calls, so the parts can travel one per call.
`install.sh` (in the kit) makes a venv over the machine's own site-packages and installs every part
present, offline.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from common.paths import BUILD_DIR, PROJECT_ROOT

log = logging.getLogger(__name__)

GPU_PATH_ROOTS: tuple[str, ...] = (
    "nvidia-pytriton",  # the server (runtime.launcher imports the package to find it)
    "tritonclient[grpc,http]",
    "diffusers",
    "transformers",
    "tokenizers",
    "safetensors",
    "pydantic-settings",
    "httpx",
)
"""What the GPU path imports beyond torch; the kit carries their dependency closure (as declared
by the installed packages, for Linux x86_64 and the target Python) less torch's own. Checked by
tests/unit/test_gpu_kit.py against what the path really imports."""
PRESENT_WITH_TORCH = ("torch",)
"""Installed on the GPU machines; they and their dependencies are never carried."""
PYTHON = "3.12"
PLATFORMS: tuple[str, ...] = (
    "manylinux_2_35_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
PART_BYTES = 60 << 20
"""Per carried part: under the 64 MiB a call carries, with room for the tree's own ignored files."""
KIT_DIR = BUILD_DIR / "gpu-kit"


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    return normalized(path.name.split("-", 1)[0])


def present_versions(freeze: str) -> dict[str, str]:
    """`pip list --format=freeze` (or `pip freeze`) text -> {normalized name: version}."""
    out = {}
    for line in freeze.splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            out[normalized(name)] = version.strip()
    return out


def project_pins(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> dict[str, str]:
    """{normalized name: version} of the project's `name==version` dependencies."""
    import tomllib

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return {normalized(d.split("==")[0].split("[")[0]): d.split("==")[1] for d in deps if "==" in d}


def needed(wanted: Mapping[str, str], present: Mapping[str, str], pins: Mapping[str, str]) -> dict[str, str]:
    """The distributions to carry: those absent there; those the project pins, when the machine has
    another version; numpy when the machine's is 2.x (pytriton's stub needs numpy below 2). A
    dependency the project does not pin is used at whatever version the machine has."""
    out = {}
    for name, version in wanted.items():
        have = present.get(normalized(name))
        numpy2 = normalized(name) == "numpy" and have is not None and int(have.split(".")[0]) >= 2
        if have is None or numpy2 or (normalized(name) in pins and have != version):
            out[name] = version
    return out


def closure(roots: Iterable[str], python: str = PYTHON) -> dict[str, str]:
    """{distribution: this machine's version} for `roots` and everything they require (declared
    dependencies, markers evaluated for Linux x86_64 CPython `python`, extras as requested)."""
    from packaging.requirements import Requirement

    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux"}
    env |= {"platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}
    env |= {"platform_python_implementation": "CPython", "os_name": "posix"}
    out: dict[str, str] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = normalized(req.name)
        if name in out:
            continue
        dist = metadata.distribution(req.name)
        out[name] = dist.version
        for spec in dist.requires or []:
            dep = Requirement(spec)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate(env | {"extra": e}) for e in extras):
                todo.append(dep)
    return out


def gpu_path_distributions(python: str = PYTHON) -> dict[str, str]:
    """GPU_PATH_ROOTS' closure less what comes with torch."""
    with_torch = closure(PRESENT_WITH_TORCH, python)
    return {n: v for n, v in closure(GPU_PATH_ROOTS, python).items() if n not in with_torch}


def download(pins: Mapping[str, str], dest: Path, python: str = PYTHON) -> list[Path]:
    """cp<python> manylinux wheels of exactly these versions, no dependencies (the list is closed)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += [f"{name}=={version}" for name, version in sorted(pins.items())]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


_STUB = re.compile(r"^pytriton/tritonserver/python_backend_stubs/(\d+\.\d+)/")
_LIBPYTHON = re.compile(r"^nvidia_pytriton\.libs/libpython3-[0-9a-f]+\.(\d+)\.so")


def slim_pytriton(wheel: Path, out_dir: Path, python: str = PYTHON) -> Path:
    """The pytriton wheel without the python backend stubs of other Pythons and the libpython they
    bundle (only the 3.13 stub links a bundled one); RECORD rewritten to match."""
    minor = python.split(".")[1]
    out = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        kept: set[str] = set()
        for info in src.infolist():
            stub, lib = _STUB.match(info.filename), _LIBPYTHON.match(info.filename)
            if (stub and stub.group(1) != python) or (lib and lib.group(1) != minor):
                continue
            if info.filename.endswith(".dist-info/RECORD"):
                continue
            kept.add(info.filename)
            dst.writestr(info, src.read(info.filename))
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        lines = [
            ln for ln in src.read(record).decode().splitlines() if ln.split(",")[0] in kept or ln.startswith(record)
        ]
        dst.writestr(record, "\n".join(lines) + "\n")
    return out


def split_parts(wheels: Iterable[Path], limit: int = PART_BYTES) -> list[list[Path]]:
    """Largest first into the first part with room: each part under `limit` bytes."""
    parts: list[list[Path]] = []
    sizes: list[int] = []
    for w in sorted(wheels, key=lambda p: -p.stat().st_size):
        size = w.stat().st_size
        if size > limit:
            raise ValueError(f"{w.name} alone ({size / 2**20:.1f} MiB) is over a part's {limit / 2**20:.0f} MiB")
        i = next((i for i, used in enumerate(sizes) if used + size <= limit), None)
        if i is None:
            parts.append([])
            sizes.append(0)
            i = len(parts) - 1
        parts[i].append(w)
        sizes[i] += size
    return parts


INSTALL_SH = """#!/bin/sh
# Offline install of every part of this kit present beside this script into a venv that also sees
# the machine's own packages (its CUDA torch): sh install.sh [VENV]; prints the venv's python.
set -e
KIT=$(cd "$(dirname "$0")" && pwd)
VENV=${1:-/tmp/fluxserve-gpu-venv}
python3 -m venv --system-site-packages "$VENV" >&2
"$VENV/bin/python" -m pip install --quiet --no-index --no-deps "$KIT"/part-*/*.whl >&2
echo "$VENV/bin/python"
"""


@dataclass(frozen=True)
class Kit:
    parts: list[list[Path]]
    carried: dict[str, str]

    def describe(self) -> str:
        lines = [f"{len(self.carried)} wheels in {len(self.parts)} part(s):"]
        for i, part in enumerate(self.parts, 1):
            size = sum(p.stat().st_size for p in part) / 2**20
            lines.append(f"  part-{i}: {size:.1f} MiB ({', '.join(p.name.split('-')[0] for p in part)})")
        return "\n".join(lines)


def build_kit(out: Path, present_freeze: str = "", python: str = PYTHON) -> Kit:
    """Download, slim and split the kit into `out/part-N/`, with `out/install.sh`."""
    carried = needed(gpu_path_distributions(python), present_versions(present_freeze), project_pins())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = download(carried, Path(tmp) / "all", python)
        final = []
        for w in wheels:
            final.append(slim_pytriton(w, Path(tmp), python) if wheel_name(w) == "nvidia-pytriton" else w)
        parts = split_parts(final)
        placed = []
        for i, part in enumerate(parts, 1):
            (out / f"part-{i}").mkdir()
            placed.append([Path(shutil.move(str(w), out / f"part-{i}" / w.name)) for w in part])
    (out / "install.sh").write_text(INSTALL_SH)
    return Kit(placed, carried)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_kit", description=__doc__.splitlines()[0])
    parser.add_argument("--present", type=Path, help="the GPU machine's `pip list --format=freeze` output")
    parser.add_argument("--python", default=PYTHON, help="the GPU machine's Python (major.minor)")
    parser.add_argument("--out", type=Path, default=KIT_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kit = build_kit(args.out, args.present.read_text() if args.present else "", args.python)
    log.info("kit in %s\n%s", args.out, kit.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
