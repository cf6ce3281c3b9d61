"""`fluxserve-bench precision`: the scratch repository serves exactly the graph under test."""

from __future__ import annotations

import json

from benchmarks.precision import render_markdown, scratch_repository
from client.contract import CLASSIFIER_ONNX, CLASSIFY


def test_scratch_repository_swaps_only_the_graph(tmp_path) -> None:
    src = tmp_path / "repo"
    for model, files in ((CLASSIFY.name, {"labels.json": "{}"}), (CLASSIFIER_ONNX.name, {"model.onnx": "fp32"})):
        for version in ("1", "3"):
            (src / model / version).mkdir(parents=True)
            for name, text in files.items():
                (src / model / version / name).write_text(f"{text}-v{version}")
        (src / model / "config.pbtxt").write_text(f"name: {model}")
    graph = tmp_path / "int8.onnx"
    graph.write_text("int8")
    dst = scratch_repository(src, graph, tmp_path / "scratch")
    assert (dst / CLASSIFIER_ONNX.name / "1" / "model.onnx").read_text() == "int8"
    assert (dst / CLASSIFY.name / "1" / "labels.json").read_text() == "{}-v3"  # the newest version
    assert sorted(p.name for p in (dst / CLASSIFY.name).iterdir()) == ["1", "config.pbtxt"]
    assert (src / CLASSIFIER_ONNX.name / "3" / "model.onnx").read_text() == "fp32-v3"  # source untouched


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
