"""A small labeled set for the classifier jobs of tests that check the job machinery (queues,
workers, liveness, locks), not what the model learns. A job trains on it through the worker's own
documented settings (FLUXSERVE_CLASSIFIER_DATA_DIR, FLUXSERVE_CLASSIFIER_TRAIN_ONLY_DATA), so an
epoch takes seconds instead of most of a minute; tests that judge accuracy keep the full set."""

from __future__ import annotations

from pathlib import Path

from training.classifier_data import DATA_DIR, HELD_OUT_DIR


def _every_kth(src: Path, dst: Path, keep: int) -> None:
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    step = max(1, len(lines) // keep)
    dst.write_text("\n".join(lines[::step][:keep]) + "\n", encoding="utf-8")


def small_classifier_env(root: Path, per_file: int = 30) -> dict[str, str]:
    """Writes `per_file` evenly spaced messages of every file of the real set (both labels and
    every tag stay represented) under `root`, and returns the worker environment that trains on it."""
    data = root / "classifier-data"
    (data / HELD_OUT_DIR.name).mkdir(parents=True, exist_ok=True)
    for src in sorted(DATA_DIR.glob("*.jsonl")):
        _every_kth(src, data / src.name, per_file)
    for src in sorted(HELD_OUT_DIR.glob("*.jsonl")):
        _every_kth(src, data / HELD_OUT_DIR.name / src.name, per_file)
    return {
        "FLUXSERVE_CLASSIFIER_DATA_DIR": str(data),
        "FLUXSERVE_CLASSIFIER_TRAIN_ONLY_DATA": "false",
        # Every epoch asked for runs: the long jobs these tests kill or cancel must still be running.
        "FLUXSERVE_CLASSIFIER_PATIENCE": "0",
    }
