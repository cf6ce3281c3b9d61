"""The documentation's shape (issue 25): a README that is a front door, pages in docs/ whose links
resolve and whose named files exist, every setting and make target documented, and no measured figures in code comments or
docstrings (a comment says why; the numbers live in docs/benchmarks.md and docs/decisions/)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.paths import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
PACKAGES = ("api", "client", "common", "contract", "export", "publish", "runtime", "serving", "training", "benchmarks")

README_MAX_LINES = 300
MIN_DOC_PAGES = 4

CLOCK_TIME = re.compile(r"\b\d\d:\d\d UTC\b")
"""A run's time of day: belongs to the run's results, not to code."""
MEASURED = re.compile(r"\bmeasur", re.IGNORECASE)
FIGURE = re.compile(r"\d(?:[\d,.]*\d)?(?:\s?(?:ms|µs|us|req/s|img/s|images/s|texts/s|%)|\ss)(?![\w/])")
"""A number with a unit of time or throughput, or a percentage: in a comment that says it was
measured, that is a measured figure."""

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def markdown_pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose(text: str) -> str:
    """Markdown without code blocks and inline code, where a `[x](y)` is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = anchor(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_a_front_door() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_docs_has_pages() -> None:
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert len(pages) >= MIN_DOC_PAGES, pages


def relative_links(page: Path) -> Iterator[str]:
    for target in LINK.findall(prose(page.read_text())):
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            yield target


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no such heading in {file.name}")
    assert not broken, broken


FILE_SPAN = re.compile(r"`([\w.-]+(?:/[\w.-]+)+\.(?:py|yaml|json|sh|md|png))(?::[\w.]+)?`")
"""A repository file named in a code span (`api/admission.py`, `common/paths.py:written_as_new_file`)."""


def named_files(text: str) -> list[str]:
    return FILE_SPAN.findall(FENCE.sub("", text))


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_files_the_docs_name_exist(page: Path) -> None:
    """Code moves (export/ -> publish/...): a page that still names the old place fails here."""
    missing = [name for name in named_files(page.read_text()) if not (PROJECT_ROOT / name).exists()]
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [gone](missing.md) [bad](#nope) `[code](x.md)`\n")
    assert list(relative_links(page)) == ["#title", "missing.md", "#nope"]
    assert anchors(page) == {"title"}
    assert anchor("`FLUXSERVE_TORCH_`: the `gpu-torch` target") == "fluxserve_torch_-the-gpu-torch-target"
    assert named_files("`export/hot_swap.py` and `common/paths.py:written_as_new_file`, not `x.py`") == [
        "export/hot_swap.py",
        "common/paths.py",
    ]


def comments_and_docstrings(source: str) -> Iterator[tuple[int, str]]:
    """(line, text) of every string statement (docstrings, attribute docstrings) and every block of
    consecutive comment lines (a sentence may run over several)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            yield node.lineno, node.value.value
    block: list[str] = []
    start = last = 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        if block and tok.start[0] == last + 1:
            block.append(tok.string)
        else:
            if block:
                yield start, "\n".join(block)
            block, start = [tok.string], tok.start[0]
        last = tok.start[0]
    if block:
        yield start, "\n".join(block)


def measured_figures(source: str) -> list[str]:
    found = []
    for line, text in comments_and_docstrings(source):
        if m := CLOCK_TIME.search(text):
            found.append(f"{line}: {m.group(0)}")
        elif MEASURED.search(text) and (m := FIGURE.search(text)):
            found.append(f"{line}: measured {m.group(0)}")
    return found


def test_the_figure_rule_can_fail() -> None:
    source = (
        '"""Ran at 12:09 UTC."""\n'
        "x = 1  # measured: 845 req/s\n"
        "z = 0\n"
        "# measured on the small model:\n# 31 ms per image\n"
        "y = 2  # 64 texts per call at most (a limit, not a measurement)\n"
        "def f():\n    '''Why: the measured rate dips under load (docs/benchmarks.md).'''\n"
    )
    assert measured_figures(source) == ["1: 12:09 UTC", "2: measured 845 req/s", "4: measured 31 ms"]


def package_sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (PROJECT_ROOT / package).rglob("*.py"))


def test_no_measured_figures_in_code_comments() -> None:
    found = [
        f"{path.relative_to(PROJECT_ROOT)}:{hit}"
        for path in package_sources()
        for hit in measured_figures(path.read_text())
    ]
    assert not found, (
        "comments and docstrings say why and point at docs/benchmarks.md or docs/decisions/; "
        f"these hold measured figures or run times: {found}"
    )


def settings_variables(source: str) -> Iterator[str]:
    """The environment variables of every pydantic-settings class in `source`: its env_prefix plus
    each field's name in capitals."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        prefix = None
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == "model_config" for t in stmt.targets):
                call = stmt.value
                if isinstance(call, ast.Call):
                    for kw in call.keywords:
                        if kw.arg == "env_prefix" and isinstance(kw.value, ast.Constant):
                            prefix = kw.value.value
        if prefix is None:
            continue
        for stmt in node.body:
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and stmt.target.id != "model_config"
            ):
                yield prefix + stmt.target.id.upper()


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"`(FLUXSERVE_[A-Z0-9_]+)`", CONFIGURATION.read_text()))
    variables = {v for path in package_sources() for v in settings_variables(path.read_text())}
    assert len(variables) > 50, "the settings scan found too few variables: is the AST walk still right?"
    missing = sorted(variables - documented)
    assert not missing, f"add these to docs/configuration.md: {missing}"


def test_every_make_target_is_documented() -> None:
    phony = re.search(r"^\.PHONY:(.*)$", (PROJECT_ROOT / "Makefile").read_text(), re.MULTILINE)
    assert phony is not None
    text = "".join(page.read_text() for page in markdown_pages())
    missing = [t for t in phony.group(1).split() if f"make {t}" not in text]
    assert not missing, f"document these make targets (docs/operations.md): {missing}"
