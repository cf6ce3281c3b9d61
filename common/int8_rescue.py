"""Where the int8 classifier asks its fp32 graph for a second opinion.

Dynamic int8 quantizes activations with one scale per call, so a text's logits move with the
texts it shares a call with. For almost every message the two classes' logits are far apart and
nothing changes, but near the boundary a message's label can flip with its batching. Rows whose int8
margin is under `margin` are encoded again in fp32 and keep that answer: a small share of chat
messages, so the labels served are fp32's at nearly int8's cost. The export scores int8 this way
too (export/classifier_precision.py). The figures behind the default margin:
docs/decisions/int8-classifier-rescue.md.
"""

from __future__ import annotations

import numpy as np


def near_boundary(logits: np.ndarray, margin: float) -> np.ndarray:
    """Indices of the rows whose top two logits are less than `margin` apart (none when margin <= 0)."""
    if margin <= 0 or logits.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    top2 = np.partition(logits, -2, axis=1)[:, -2:]
    return np.flatnonzero(top2[:, 1] - top2[:, 0] < margin)
