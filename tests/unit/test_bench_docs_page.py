"""README tables come from the benchmark's own markdown, spliced between markers."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.readme import README, SECTIONS, markers, splice, update_readme


def test_splice_replaces_only_its_block_and_demotes_headings() -> None:
    start, end = markers("run")
    text = f"intro\n{start}\nold table\n{end}\noutro\n"
    out = splice(text, "run", "### Benchmark (today)\n\n| a |\n|---|\n| 1 |\n")
    assert out == f"intro\n{start}\n#### Benchmark (today)\n\n| a |\n|---|\n| 1 |\n{end}\noutro\n"
    assert splice(out, "run", "### again") == f"intro\n{start}\n#### again\n{end}\noutro\n"


def test_missing_block_is_an_error() -> None:
    with pytest.raises(ValueError):
        splice("no markers here", "run", "x")


def test_update_readme_uses_the_result_files(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("\n".join(f"{a}\n{b}" for a, b in (markers("run"), markers("swap"))) + "\n")
    (tmp_path / "latest.md").write_text("### run table\n")
    assert update_readme(readme, {"run": tmp_path / "latest.md", "swap": tmp_path / "absent.md"}) == ["run"]
    assert "#### run table" in readme.read_text()


def test_the_real_readme_has_every_block() -> None:
    text = README.read_text()
    for section in SECTIONS:
        start, end = markers(section)
        assert text.index(start) < text.index(end)
