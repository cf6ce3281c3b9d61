"""Train recipe variants under several seeds, and compare them by the spread, not one split.

The seed draws the stratified split as well as the initialization and batch order, so one seed's
test figure is one draw of 170 messages: on this data the served recipe's test accuracy spreads over
several points across seeds 0-4 (docs/benchmarks.md, "Classifier quality"). A recipe change is
judged here by every seed's validation, test and held-out figures side by side. Each run trains into
a scratch folder (only its metrics are kept: a model is 90 MB), from the settings
`ClassifierTrainSettings` reads (FLUXSERVE_CLASSIFIER_*) with one setting varied.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from training.classifier import ClassifierTrainSettings, train_classifier

log = logging.getLogger(__name__)

COLUMNS = ("validation", "test", "held_out")


def _row(setting: str, value: Any, seed: int, metrics: dict) -> dict:
    calibrated = metrics["calibrated"]
    flags = calibrated["test"]["flagging"]
    return {
        "setting": setting,
        "value": value,
        "seed": seed,
        **{column: calibrated[column]["accuracy"] for column in COLUMNS},
        "test_errors": flags["errors"],
        "test_errors_flagged": flags["errors_flagged"],
        "test_correct_flagged": flags["correct_flagged"],
        "best_epoch": metrics["best_epoch"],
    }


def sweep(
    base: ClassifierTrainSettings, setting: str, values: Sequence[Any], seeds: Sequence[int], out_dir: Path
) -> list[dict]:
    """Every (value of `setting`, seed) trained from `base`; each run's metrics and a summary go to out_dir."""
    if setting not in ClassifierTrainSettings.model_fields or setting in ("seed", "output_dir"):
        raise ValueError(f"{setting!r} is not a classifier training setting to vary")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for value in values:
        # Validated as the environment or the CLI would be: a bad value fails before any training.
        variant = ClassifierTrainSettings.model_validate({**base.model_dump(), setting: value})
        for seed in seeds:
            scratch = Path(tempfile.mkdtemp(prefix=f"classifier-{value}-{seed}-"))
            try:
                metrics = train_classifier(variant.model_copy(update={"seed": seed, "output_dir": scratch}))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            (out_dir / f"{setting}={value}-seed{seed}.json").write_text(json.dumps(metrics, indent=2))
            rows.append(_row(setting, getattr(variant, setting), seed, metrics))
            log.info("%s=%s seed %d: test %.4f", setting, value, seed, rows[-1]["test"])
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
    (out_dir / "summary.md").write_text(markdown(rows))
    return rows


def markdown(rows: list[dict]) -> str:
    setting = rows[0]["setting"] if rows else "setting"
    lines = [
        f"| {setting} | seed | validation | test | held-out | test errors | of them flagged | correct flagged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['value']} | {r['seed']} | {r['validation']:.1%} | {r['test']:.1%} | {r['held_out']:.1%} "
            f"| {r['test_errors']} | {r['test_errors_flagged']:.0%} | {r['test_correct_flagged']:.1%} |"
        )
    for value in dict.fromkeys(str(r["value"]) for r in rows):
        mine = [r for r in rows if str(r["value"]) == value]
        lines.append(
            f"| **{value}: mean of {len(mine)} seeds** | | "
            + " | ".join(f"{mean(r[c] for r in mine):.1%}" for c in COLUMNS)
            + f" | {mean(r['test_errors'] for r in mine):.1f} "
            + f"| {mean(r['test_errors_flagged'] for r in mine):.0%} "
            + f"| {mean(r['test_correct_flagged'] for r in mine):.1%} |"
        )
    return "\n".join(lines) + "\n"
