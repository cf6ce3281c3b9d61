"""Classification metrics and the uncertainty threshold (numpy only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from client.contract import IMAGE_REQUEST, LABELS


@dataclass(frozen=True)
class Scores:
    n: int
    accuracy: float
    f1_image_request: float
    f1_macro: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _f1(y_true: np.ndarray, y_pred: np.ndarray, positive: int) -> float:
    tp = int(((y_pred == positive) & (y_true == positive)).sum())
    fp = int(((y_pred == positive) & (y_true != positive)).sum())
    fn = int(((y_pred != positive) & (y_true == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def score(y_true: np.ndarray, y_pred: np.ndarray) -> Scores:
    f1s = [_f1(y_true, y_pred, k) for k in range(len(LABELS))]
    return Scores(
        n=len(y_true),
        accuracy=float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        f1_image_request=f1s[LABELS.index(IMAGE_REQUEST)],
        f1_macro=float(np.mean(f1s)),
    )


def recommend_threshold(y_true: np.ndarray, probs: np.ndarray, target_accuracy: float = 0.98) -> dict[str, float]:
    """Lowest confidence t such that predictions with max-prob >= t reach `target_accuracy`.

    Below t the service flags the answer as uncertain instead of silently guessing; coverage is
    the share of validation messages the model answers with confidence.
    """
    conf = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    for t in np.round(np.arange(0.50, 0.996, 0.01), 2):
        keep = conf >= t
        if keep.sum() == 0:
            break
        if (pred[keep] == y_true[keep]).mean() >= target_accuracy:
            return {"threshold": float(t), "coverage": float(keep.mean()), "accuracy_above": float((pred[keep] == y_true[keep]).mean())}
    return {"threshold": 0.99, "coverage": float((conf >= 0.99).mean()), "accuracy_above": float("nan")}
