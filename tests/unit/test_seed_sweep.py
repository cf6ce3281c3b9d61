"""`fluxserve-train seeds`: each (variant, seed) really trains, its metrics are kept, its model is not."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.small_classifier_data import small_classifier_env
from training.classifier import ClassifierTrainSettings
from training.seed_sweep import sweep

SAMPLE_PER_FILE = 80


@pytest.mark.slow
def test_a_sweep_trains_every_variant_and_seed_and_keeps_only_the_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"  # where each run's model goes: its own, so nothing else writes there
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "out"
    # The sweep's machinery, on a sample of the real set (a quarter of it: seconds per epoch, not half a minute).
    data = small_classifier_env(tmp_path, per_file=SAMPLE_PER_FILE)["FLUXSERVE_CLASSIFIER_DATA_DIR"]
    base = ClassifierTrainSettings(epochs=3, data_dir=Path(data), train_only_data=False)
    rows = sweep(base, "pooling", ["cls", "mean"], seeds=[3], out_dir=out)

    assert [(r["value"], r["seed"]) for r in rows] == [("cls", 3), ("mean", 3)]
    temperatures = set()
    for row in rows:
        metrics = json.loads((out / f"pooling={row['value']}-seed3.json").read_text())
        assert metrics["settings"]["pooling"] == row["value"] and metrics["settings"]["seed"] == 3
        assert row["test"] == metrics["calibrated"]["test"]["accuracy"]
        # Three epochs on the sample already learn the task: far above the 50% of a coin.
        assert 0.75 < row["validation"] <= 1 and 0.75 < row["test"] <= 1
        temperatures.add(metrics["temperature"])
    assert len(temperatures) == 2  # two different networks were trained and calibrated
    assert json.loads((out / "summary.json").read_text()) == rows
    summary = (out / "summary.md").read_text()
    assert "| **cls: mean of 1 seeds** |" in summary and "| **mean: mean of 1 seeds** |" in summary
    assert list(scratch.iterdir()) == []


def test_a_sweep_refuses_what_it_cannot_vary_before_training(tmp_path: Path) -> None:
    base = ClassifierTrainSettings()
    with pytest.raises(ValueError, match="not a classifier training setting"):
        sweep(base, "colour", ["red"], [0], tmp_path)
    with pytest.raises(ValueError, match="not a classifier training setting"):
        sweep(base, "seed", [1, 2], [0], tmp_path)
    with pytest.raises(ValidationError):
        sweep(base, "text_normalization", ["lowercase"], [0], tmp_path)
    assert not any(tmp_path.iterdir())
