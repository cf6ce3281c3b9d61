from __future__ import annotations

import numpy as np

from training.metrics import score


def test_scores() -> None:
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0, 1, 1, 1, 0])
    s = score(y, p)
    assert s.accuracy == 0.6
    # image_request is index 1: tp=2 fp=1 fn=1 -> f1 = 4/6
    assert abs(s.f1_image_request - 4 / 6) < 1e-9
