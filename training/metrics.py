"""Classification metrics and the uncertainty threshold (numpy only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from contract.specs import IMAGE_REQUEST, LABELS


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


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature T minimising the negative log-likelihood of softmax(logits / T).

    One scalar cannot change which label wins, only how sure the scores are: a fine-tuned
    encoder's raw scores sit near 0.99 even on its mistakes, so T > 1 usually spreads them.
    A log-spaced grid then a finer one around the best is plenty for one convex parameter.
    """
    if len(y_true) == 0:
        return 1.0

    def nll(t: float) -> float:
        p = softmax(logits, t)[np.arange(len(y_true)), y_true]
        return float(-np.log(np.clip(p, 1e-12, None)).mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(50.0), 200))
    best = min(grid, key=nll)
    fine = np.linspace(best / 1.05, best * 1.05, 41)
    return float(min(fine, key=nll))


@dataclass(frozen=True)
class Flagging:
    """How well `uncertain` (confidence < threshold) separates errors from correct answers."""

    threshold: float
    n: int
    errors: int
    errors_flagged: float
    """Share of wrong answers flagged uncertain (1.0 when there are none)."""
    correct_flagged: float
    """Share of right answers flagged uncertain."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def flagging(y_true: np.ndarray, probs: np.ndarray, threshold: float) -> Flagging:
    conf = probs.max(axis=1)
    wrong = probs.argmax(axis=1) != y_true
    flagged = conf < threshold
    return Flagging(
        threshold=float(threshold),
        n=len(y_true),
        errors=int(wrong.sum()),
        errors_flagged=float(flagged[wrong].mean()) if wrong.any() else 1.0,
        correct_flagged=float(flagged[~wrong].mean()) if (~wrong).any() else 0.0,
    )


def uncertainty_threshold(y_true: np.ndarray, probs: np.ndarray, max_correct_flagged: float = 0.06) -> Flagging:
    """The highest confidence threshold that flags at most `max_correct_flagged` of the right
    answers: it catches as many errors as that budget of needless flags allows.

    Chosen on the validation split; the budget sits below the 10% target so that a test split
    a little less confident than validation still stays inside it.
    """
    conf = np.sort(probs.max(axis=1)[probs.argmax(axis=1) == y_true])
    if len(conf) == 0:
        return flagging(y_true, probs, 0.5)
    # Flag strictly below the k-th lowest correct confidence: exactly k correct answers flagged.
    k = int(np.floor(max_correct_flagged * len(conf)))
    t = float(conf[min(k, len(conf) - 1)])
    return flagging(y_true, probs, max(t, 0.5))
