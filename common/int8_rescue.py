"""Where the int8 classifier asks its fp32 graph for a second opinion.

Dynamic int8 quantizes activations with one scale per call, so a text's logits move with the
texts it shares a call with. For almost every message the two classes' logits are far apart (the
margin between them spans about ±8) and nothing changes, but near the boundary a message's label
can: on the shipped model's 170 test messages one label (fp32 margin 0.61) flipped in two of three
batchings, and across all 1,145 messages int8 moved a margin by up to 4.0 (validation split, six
shuffled batchings of 8: up to 5.0). Rows whose int8 margin is under `margin` are encoded again in
fp32 and keep that answer: about 2% of chat messages at margin 6, so the labels served are fp32's
at int8's speed. The export measures int8 this way too (export/classifier_precision.py).
"""

from __future__ import annotations

import numpy as np


def near_boundary(logits: np.ndarray, margin: float) -> np.ndarray:
    """Indices of the rows whose top two logits are less than `margin` apart (none when margin <= 0)."""
    if margin <= 0 or logits.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    top2 = np.partition(logits, -2, axis=1)[:, -2:]
    return np.flatnonzero(top2[:, 1] - top2[:, 0] < margin)
