"""Print pinned requirement lines from pyproject.toml, the one place versions are pinned.

    python3 requirements.py pyproject.toml dependencies       # [project] dependencies
    python3 requirements.py pyproject.toml no-deps            # [tool.fluxserve] no-deps
    python3 requirements.py pyproject.toml serving-packages   # the pins of the python models' packages

Runs inside image builds with the base image's bare Python (stdlib only).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def requirement_name(req: str) -> str:
    """`tritonclient[grpc,http]==2.73.0` -> `tritonclient` (normalised as PEP 503 does)."""
    name = re.split(r"[\[<>=!~;\s]", req, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, section: str) -> list[str]:
    data = tomllib.loads(pyproject.read_text())
    deps: list[str] = data["project"]["dependencies"]
    tool = data["tool"]["fluxserve"]
    if section == "dependencies":
        return deps
    if section == "no-deps":
        return list(tool["no-deps"])
    if section == "serving-packages":
        pins = {requirement_name(d): d for d in deps}
        missing = [n for n in tool["serving-packages"] if requirement_name(n) not in pins]
        if missing:
            raise SystemExit(f"serving-packages not pinned in [project] dependencies: {missing}")
        return [pins[requirement_name(n)] for n in tool["serving-packages"]]
    raise SystemExit(f"unknown section {section!r}")


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1]), sys.argv[2])))
