"""Temperature scaling, the uncertainty threshold, and the served softmax that applies them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.classify_pipeline import LabelInfo, calibrated_softmax
from training.metrics import fit_temperature, flagging, softmax, uncertainty_threshold


def _overconfident(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits 4x too sure: s ~ N(+-1, sqrt 2) per class makes p(y=1 | s) = sigmoid(s) exactly,
    and the model reports 4 s, so the NLL-optimal temperature is 4."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = (2 * y - 1) + rng.normal(0, np.sqrt(2), n)
    logits = np.stack([np.zeros(n), 4 * s], axis=1)
    return logits, y


def test_temperature_undoes_overconfidence() -> None:
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert 3.3 < t < 4.8, t
    # Calibration never changes the label, only the scores.
    assert (softmax(logits, t).argmax(1) == logits.argmax(1)).all()


def test_temperature_of_perfectly_scaled_logits_is_about_one() -> None:
    logits, y = _overconfident()
    assert 0.8 < fit_temperature(logits / 4, y) < 1.2


def test_threshold_respects_the_budget_of_flagged_correct_answers() -> None:
    logits, y = _overconfident()
    probs = softmax(logits, fit_temperature(logits, y))
    chosen = uncertainty_threshold(y, probs, max_correct_flagged=0.06)
    assert chosen.correct_flagged <= 0.06
    # Flags are informative: an error is far likelier to be flagged than a right answer.
    assert chosen.errors > 0 and chosen.errors_flagged > 2 * chosen.correct_flagged
    again = flagging(y, probs, chosen.threshold)
    assert again == chosen


def test_flagging_counts() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.95, 0.05]])  # items 1 and 3 wrong
    f = flagging(y, probs, threshold=0.8)
    assert f.errors == 2
    assert f.errors_flagged == 0.5  # 0.6 flagged, 0.95 not
    assert f.correct_flagged == 0.5  # 0.7 flagged, 0.9 not


def test_served_softmax_applies_the_stored_temperature(tmp_path) -> None:
    path = tmp_path / "labels.json"
    path.write_text(
        json.dumps({"labels": ["conversation", "image_request"], "temperature": 2.0, "recommended_threshold": 0.8})
    )
    info = LabelInfo.load(path)
    assert info.temperature == 2.0 and info.threshold == 0.8
    got = calibrated_softmax(np.array([[0.0, 4.0]]), info.temperature)
    assert np.allclose(got, softmax(np.array([[0.0, 2.0]])), atol=1e-6)
    path.write_text(json.dumps({"labels": ["conversation", "image_request"], "temperature": 0}))
    with pytest.raises(ValueError):
        LabelInfo.load(path)
