from __future__ import annotations

import numpy as np

from training.metrics import recommend_threshold, score


def test_scores() -> None:
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0, 1, 1, 1, 0])
    s = score(y, p)
    assert s.accuracy == 0.6
    # image_request is index 1: tp=2 fp=1 fn=1 -> f1 = 4/6
    assert abs(s.f1_image_request - 4 / 6) < 1e-9


def test_threshold_excludes_low_confidence_errors() -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    probs = np.array([[0.99, 0.01], [0.02, 0.98], [0.55, 0.45], [0.45, 0.55], [0.40, 0.60], [0.97, 0.03]])
    # The only error (index 4 predicts 1, true 1 -> correct; index 2 correct) -> add a wrong one:
    y[3] = 0
    r = recommend_threshold(y, probs, target_accuracy=1.0)
    assert 0.55 < r["threshold"] <= 0.97
    assert 0 < r["coverage"] < 1
