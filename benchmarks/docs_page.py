"""`fluxserve-bench readme`: put the latest measured tables into README.md.

The README shows what the benchmark last measured, never numbers typed by hand: each result's
markdown (written next to its JSON by `fluxserve-bench run` / `swap` / `precision` / `overload` / `goodput` /
`recovery` / `wrk`) replaces the text between
its pair of markers.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from common.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

README = PROJECT_ROOT / "README.md"
RESULTS = PROJECT_ROOT / "benchmarks" / "results"
SECTIONS: dict[str, Path] = {
    "run": RESULTS / "latest.md",
    "swap": RESULTS / "swap.md",
    "precision": RESULTS / "precision" / "latest.md",
    "overload": RESULTS / "overload.md",
    "goodput": RESULTS / "goodput.md",
    "recovery": RESULTS / "recovery.md",
    "wrk": RESULTS / "wrk.md",
    "gpu": RESULTS / "gpu.md",  # the latest non-dry `fluxserve-bench gpu` (benchmarks/gpu.py)
}


def markers(section: str) -> tuple[str, str]:
    return f"<!-- fluxserve-bench:{section} -->", f"<!-- /fluxserve-bench:{section} -->"


def splice(text: str, section: str, body: str) -> str:
    start, end = markers(section)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"README has no {start} ... {end} block")
    # Result headings are h3; inside the README's "Measured" section they sit one level lower.
    body = re.sub(r"^(#{3,5}) ", lambda m: "#" + m.group(1) + " ", body.strip(), flags=re.MULTILINE)
    return pattern.sub(lambda _m: f"{start}\n{body}\n{end}", text, count=1)


def update_readme(readme: Path = README, sections: dict[str, Path] = SECTIONS) -> list[str]:
    """Splice every section whose result exists; returns the sections updated."""
    text = readme.read_text()
    done = []
    for section, source in sections.items():
        if source.exists():
            text = splice(text, section, source.read_text())
            done.append(section)
        else:
            log.warning("no %s yet: README section %r left as it is", source, section)
    readme.write_text(text)
    return done
