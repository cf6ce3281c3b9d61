"""docs/benchmarks.md's tables come from the benchmarks' own markdown, spliced between markers, with
the date of the run stated once at the top instead of a clock time in each section."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.cli import build_parser
from benchmarks.docs_page import DATE_SECTION, PAGE, SECTIONS, markers, splice, undated, update_page


def test_splice_replaces_only_its_block() -> None:
    start, end = markers("run")
    text = f"intro\n{start}\nold table\n{end}\noutro\n"
    out = splice(text, "run", "### Benchmark\n\n| a |\n|---|\n| 1 |\n")
    assert out == f"intro\n{start}\n### Benchmark\n\n| a |\n|---|\n| 1 |\n{end}\noutro\n"
    assert splice(out, "run", "### again") == f"intro\n{start}\n### again\n{end}\noutro\n"


def test_missing_block_is_an_error() -> None:
    with pytest.raises(ValueError):
        splice("no markers here", "run", "x")


def test_undated_takes_the_run_time_out_of_headings_only() -> None:
    body = "### Benchmark (2026-11-26 16:04 UTC)\n\ntext (2026-11-26 16:04 UTC) stays\n#### Sub (2026-11-27 01:00 UTC, smoke)"
    out, dates = undated(body)
    assert out == "### Benchmark\n\ntext (2026-11-26 16:04 UTC) stays\n#### Sub (smoke)"
    assert dates == ["2026-11-26", "2026-11-27"]


def test_update_page_uses_the_result_files_and_states_the_date_once(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text("\n".join(f"{a}\n{b}" for a, b in map(markers, (DATE_SECTION, "run", "swap", "wrk"))) + "\n")
    (tmp_path / "latest.md").write_text("### Benchmark (2026-11-26 16:04 UTC)\n\n| run table |\n")
    (tmp_path / "swap.md").write_text("### Training job and hot swap (2026-11-27 09:00 UTC)\n")
    (tmp_path / "wrk.md").write_text("| wrk table |\n")
    sources = {"run": tmp_path / "latest.md", "swap": tmp_path / "swap.md", "wrk": tmp_path / "wrk.md"}
    sources["gpu"] = tmp_path / "absent.md"
    assert update_page(page, sources) == ["run", "swap", "wrk"]
    text = page.read_text()
    assert "### Benchmark\n\n| run table |" in text and "| wrk table |" in text
    assert "UTC" not in text
    assert text.count("2026-11-26 to 2026-11-27") == 1 and "`run`, `swap`" in text


def test_without_dated_results_the_date_block_stays(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    start, end = markers(DATE_SECTION)
    page.write_text(f"{start}\nMeasured on 2026-01-01.\n{end}\n" + "\n".join(markers("wrk")) + "\n")
    (tmp_path / "wrk.md").write_text("| wrk table |\n")
    update_page(page, {"wrk": tmp_path / "wrk.md"})
    assert "Measured on 2026-01-01." in page.read_text()


def test_the_real_page_has_every_block_and_no_clock_times() -> None:
    text = PAGE.read_text()
    for section in (DATE_SECTION, *SECTIONS):
        start, end = markers(section)
        assert text.index(start) < text.index(end)
    assert text.index(markers(DATE_SECTION)[0]) < text.index("\n## ")
    assert undated(text)[1] == []


@pytest.mark.parametrize("name", ["docs", "readme"])
def test_the_command_and_its_old_name(name: str) -> None:
    assert build_parser().parse_args([name]).fn.__name__ == "_docs"
