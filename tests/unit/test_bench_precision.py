"""`fluxserve-bench precision`: the scratch repository serves exactly the graph under test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.precision import render_markdown, scratch_repository
from contract.specs import CLASSIFIER_ONNX, CLASSIFY, INLINE_ENCODER_PARAMETER
from export.deployments import INLINE_ENCODER_FILE


def _source(tmp_path: Path, classify_config: str) -> Path:
    src = tmp_path / "repo"
    classify_files = {"labels.json": "{}", INLINE_ENCODER_FILE: "fp32"}
    for model, files in ((CLASSIFY.name, classify_files), (CLASSIFIER_ONNX.name, {"model.onnx": "fp32"})):
        for version in ("1", "3"):
            (src / model / version).mkdir(parents=True)
            for name, text in files.items():
                (src / model / version / name).write_text(f"{text}-v{version}")
        (src / model / "config.pbtxt").write_text(f'name: "{model}"')
    (src / CLASSIFY.name / "config.pbtxt").write_text(classify_config)
    return src


@pytest.mark.parametrize("inline", [True, False])
def test_scratch_repository_swaps_only_the_graph(tmp_path: Path, inline: bool) -> None:
    parameter = f'parameters {{ key: "{INLINE_ENCODER_PARAMETER}" value {{ string_value: "{INLINE_ENCODER_FILE}" }} }}'
    src = _source(tmp_path, f'name: "{CLASSIFY.name}" ' + (parameter if inline else ""))
    graph = tmp_path / "int8.onnx"
    graph.write_text("int8")
    dst = scratch_repository(src, graph, tmp_path / "scratch")
    assert (dst / CLASSIFIER_ONNX.name / "1" / "model.onnx").read_text() == "int8"
    # The encoder `classify` runs itself (CPU default) is the graph under test too; else untouched.
    assert (dst / CLASSIFY.name / "1" / INLINE_ENCODER_FILE).read_text() == ("int8" if inline else "fp32-v3")
    assert (dst / CLASSIFY.name / "1" / "labels.json").read_text() == "{}-v3"  # the newest version
    assert sorted(p.name for p in (dst / CLASSIFY.name).iterdir()) == ["1", "config.pbtxt"]
    assert (src / CLASSIFIER_ONNX.name / "3" / "model.onnx").read_text() == "fp32-v3"  # source untouched
    assert (src / CLASSIFY.name / "3" / INLINE_ENCODER_FILE).read_text() == "fp32-v3"


def test_markdown_has_every_row() -> None:
    row = {"req_s": 100.0, "p99_ms": 50.0, "errors": 0, "total_cpu_ms": 4.0, "cpu_ms_per_request": {"facade": 0.5}}
    out = {
        "concurrency": 32,
        "duration_s": 10,
        "ort_limit": {"int8": {"best_texts_per_s": 900, "best_batch_size": 16}},
        "rows": [
            {**row, "variant": "pytorch", "target": "baseline-classify"},
            {**row, "variant": "int8", "target": "facade-classify", "vs_baseline": 12.0, "of_ort_limit": 0.9},
        ],
    }
    md = render_markdown(json.loads(json.dumps(out)))
    assert "| int8 | facade-classify | 100.0 | 50.0 | 0 | 12.00× | 90% |" in md
    assert "| int8 | 900 | 16 |" in md
