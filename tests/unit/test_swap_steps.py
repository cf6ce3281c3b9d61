"""What a LoRA swap asks Triton to reload: unchanged configs stay untouched (Triton would reload
every loaded version of a model whose config file changed), and generate / generate_stream load
as one concurrent step after the components they pin."""

from __future__ import annotations

import os
from pathlib import Path

from client.contract import FLUX_PREPARE, FLUX_TRANSFORMER, GENERATE, GENERATE_STREAM
from export.deployments import flux_deployments
from export.hot_swap import _steps
from export.repository import write_config


def test_unchanged_config_is_not_rewritten(tmp_path: Path) -> None:
    dep = flux_deployments()[FLUX_TRANSFORMER]
    path = write_config(tmp_path, dep, "cpu")
    os.utime(path, ns=(1, 1))
    write_config(tmp_path, dep, "cpu")
    assert path.stat().st_mtime_ns == 1, "an identical config was rewritten"
    path.write_text(path.read_text() + "\n# stale\n")
    write_config(tmp_path, dep, "cpu")
    assert "stale" not in path.read_text() and path.stat().st_mtime_ns != 1


def test_pipelines_load_together_after_their_components() -> None:
    together = frozenset({GENERATE.name, GENERATE_STREAM.name})
    changed = [FLUX_TRANSFORMER, GENERATE.name, GENERATE_STREAM.name]
    assert _steps(changed, together) == [FLUX_TRANSFORMER, (GENERATE.name, GENERATE_STREAM.name)]
    assert _steps([FLUX_PREPARE.name, GENERATE.name], together) == [FLUX_PREPARE.name, (GENERATE.name,)]
    assert _steps([FLUX_TRANSFORMER], together) == [FLUX_TRANSFORMER]
