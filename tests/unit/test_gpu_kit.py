"""The GPU machine's wheel kit (benchmarks/gpu_kit.py): what it carries, how it slims pytriton, how it splits.

No download here: the closure comes from this machine's installed metadata, the pytriton slimming
runs on a wheel-shaped zip, and the carried list is checked against what the GPU path really
imports (in a subprocess), so a new import outside the kit fails here rather than on a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks.gpu_kit import (
    INSTALL_SH,
    closure,
    gpu_path_distributions,
    needed,
    normalized,
    present_versions,
    project_pins,
    slim_pytriton,
    split_parts,
)

OPTIONAL_IMPORTS = {"accelerate", "peft", "opentelemetry-api", "psutil", "fluxserve"}
"""Imported by the GPU path's libraries only when installed (diffusers' and tritonclient's
optional integrations), and the project itself (it travels as the working tree)."""


def test_present_packages_at_our_version_stay_behind() -> None:
    present = present_versions("numpy==2.1.0\nTransformers==5.24.0\ndiffusers==0.30.0\n# comment\nsh==1.0\n")
    assert present["transformers"] == "5.24.0"
    wanted = {"numpy": "1.26.4", "transformers": "5.24.0", "diffusers": "0.42.1", "sh": "2.0.7", "pyzmq": "27.0"}
    pins = project_pins()
    assert pins["diffusers"] == "0.42.1" and "sh" not in pins
    # numpy 2 there (pytriton's stub needs 1.x); pinned diffusers at another version; pyzmq absent;
    # sh, which the project does not pin, is used at the version the machine has.
    assert needed(wanted, present, pins) == {"numpy": "1.26.4", "diffusers": "0.42.1", "pyzmq": "27.0"}
    assert needed({"numpy": "1.26.4"}, {"numpy": "1.26.4"}, pins) == {}


def test_closure_follows_extras_and_leaves_torch_behind() -> None:
    dists = gpu_path_distributions()
    assert {"nvidia-pytriton", "tritonclient", "gevent", "geventhttpclient", "grpcio", "diffusers", "numpy"} <= set(
        dists
    )
    assert not {"torch", "filelock", "sympy", "networkx", "jinja2"} & set(dists)
    assert "geventhttpclient" not in closure(["tritonclient"])  # only the http extra pulls it


def test_the_kit_covers_what_the_gpu_path_imports() -> None:
    code = "\n".join(
        [
            "import sys, types, json, importlib.metadata as md",
            "sys.modules['triton_python_backend_utils'] = types.ModuleType('triton_python_backend_utils')",
            "import benchmarks.gpu, publish.flux, export.flux.torch_export, export.flux.full_size",
            "import export.flux.lora, runtime.launcher, serving.triton_flux_component, serving.triton_torch",
            "import serving.triton_generate, serving.triton_flux_prepare, client.triton_client, pytriton",
            "import tritonclient.http, tritonclient.grpc",
            "from diffusers import FluxPipeline, FluxTransformer2DModel, AutoencoderKL",
            "from transformers import CLIPTextModel, T5EncoderModel, CLIPTokenizer, T5TokenizerFast",
            "pd = md.packages_distributions()",
            "print(json.dumps(sorted({d for m in list(sys.modules) for d in pd.get(m.split('.')[0], [])})))",
        ]
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {normalized(d) for d in json.loads(proc.stdout.splitlines()[-1])}
    covered = set(gpu_path_distributions()) | set(closure(["torch"])) | OPTIONAL_IMPORTS
    assert imported - covered == set()


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    record = "pkg-1.0.dist-info/RECORD"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(record, "".join(f"{n},sha256=x,{len(d)}\n" for n, d in files.items()) + f"{record},,\n")
    return path


def test_slim_pytriton_keeps_one_pythons_stub_and_rewrites_record(tmp_path: Path) -> None:
    stubs = "pytriton/tritonserver/python_backend_stubs"
    files = {
        f"{stubs}/3.11/triton_python_backend_stub": b"a" * 10,
        f"{stubs}/3.12/triton_python_backend_stub": b"b" * 10,
        f"{stubs}/3.13/triton_python_backend_stub": b"c" * 10,
        "nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0": b"d" * 10,
        "nvidia_pytriton.libs/libtritonserver-717102f0.so": b"e" * 10,
        "pytriton/tritonserver/bin/tritonserver": b"f" * 10,
    }
    out = tmp_path / "out"
    out.mkdir()
    slim = slim_pytriton(_wheel(tmp_path / "nvidia_pytriton-0.7.0-py3-none-any.whl", files), out, "3.12")
    with zipfile.ZipFile(slim) as z:
        names = set(z.namelist())
        record = z.read("pkg-1.0.dist-info/RECORD").decode()
    assert names == {
        f"{stubs}/3.12/triton_python_backend_stub",
        "nvidia_pytriton.libs/libtritonserver-717102f0.so",
        "pytriton/tritonserver/bin/tritonserver",
        "pkg-1.0.dist-info/RECORD",
    }
    assert {line.split(",")[0] for line in record.splitlines()} == names


def test_parts_stay_under_the_limit(tmp_path: Path) -> None:
    wheels = []
    for i, size in enumerate((50, 30, 25, 10, 5)):
        (tmp_path / f"w{i}.whl").write_bytes(b"x" * size)
        wheels.append(tmp_path / f"w{i}.whl")
    parts = split_parts(wheels, limit=60)
    assert sorted(p.name for part in parts for p in part) == sorted(w.name for w in wheels)
    assert all(sum(p.stat().st_size for p in part) <= 60 for part in parts) and len(parts) == 2
    (tmp_path / "big.whl").write_bytes(b"x" * 61)
    with pytest.raises(ValueError, match="over a part"):
        split_parts([tmp_path / "big.whl"], limit=60)


def test_install_script_is_offline() -> None:
    assert "--no-index" in INSTALL_SH and "--system-site-packages" in INSTALL_SH
