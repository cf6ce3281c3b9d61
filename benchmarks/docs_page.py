"""`fluxserve-bench docs` (alias `readme`): put the latest measured tables into docs/benchmarks.md.

The page shows what the benchmarks last measured, never numbers typed by hand: each result's
markdown (written next to its JSON by `fluxserve-bench run` / `swap` / `precision` / `overload` /
`goodput` / `recovery` / `wrk` / `gpu`) replaces the text between its pair of markers. A result's
heading carries the time of its run; the page states the date once, at the top (its `date` block),
so the sections do not each carry a clock time.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from common.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

PAGE = PROJECT_ROOT / "docs" / "benchmarks.md"
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
    "adapter-mix": RESULTS / "adapter_mix.md",
    "adapter-ready": RESULTS / "adapter_ready.md",
}
DATE_SECTION = "date"
"""The block at the top of the page that names the date of the runs its tables come from."""

_DATED_HEADING = re.compile(
    r"^(?P<head>#{1,6} .*?) \((?P<date>\d{4}-\d{2}-\d{2}) \d{2}:\d{2} UTC(?P<smoke>, smoke)?\)[ \t]*$", re.MULTILINE
)
"""A result heading as the reports write it: `### Benchmark (<YYYY-MM-DD> <HH:MM> UTC)`."""


def markers(section: str) -> tuple[str, str]:
    return f"<!-- fluxserve-bench:{section} -->", f"<!-- /fluxserve-bench:{section} -->"


def undated(body: str) -> tuple[str, list[str]]:
    """`body` with the run time taken out of its headings, and the dates those headings named."""
    dates: list[str] = []

    def strip(m: re.Match[str]) -> str:
        dates.append(m.group("date"))
        return m.group("head") + (" (smoke)" if m.group("smoke") else "")

    return _DATED_HEADING.sub(strip, body.strip()), dates


def date_line(dated: dict[str, list[str]]) -> str:
    """The page's one statement of when its tables were measured: the dates the results' headings
    named (ISO dates sort as text), and which tables named them (the other reports carry no date)."""
    found = sorted({d for dates in dated.values() for d in dates})
    when = found[0] if len(found) == 1 else f"{found[0]} to {found[-1]}"
    tables = ", ".join(f"`{section}`" for section in dated)
    return f"Measured on {when} ({tables}; written by `fluxserve-bench docs`)."


def splice(text: str, section: str, body: str) -> str:
    """`text` with the block between `section`'s markers replaced by `body`."""
    start, end = markers(section)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"the page has no {start} ... {end} block")
    return pattern.sub(lambda _m: f"{start}\n{body.strip()}\n{end}", text, count=1)


def update_page(page: Path = PAGE, sections: dict[str, Path] = SECTIONS) -> list[str]:
    """Splice every section whose result exists, then the date block; returns the sections updated."""
    text = page.read_text()
    done: list[str] = []
    dated: dict[str, list[str]] = {}
    for section, source in sections.items():
        if not source.exists():
            log.warning("no %s yet: section %r of %s left as it is", source, section, page.name)
            continue
        body, dates = undated(source.read_text())
        text = splice(text, section, body)
        if dates:
            dated[section] = dates
        done.append(section)
    if dated:
        text = splice(text, DATE_SECTION, date_line(dated))
    page.write_text(text)
    return done
