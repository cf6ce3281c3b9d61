"""The encoder `classify` runs in its own process (CPU target), as its config describes it.

The served graph through the deployment's runner, and, when the graph is int8 and the config names
a rescue, the fp32 graph for the few rows whose int8 logits lie near the decision boundary
(common/int8_rescue.py): their labels are then fp32's, at int8's cost for everything else.
The in-process benchmark builds the same object, so its limit includes the rescue's cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from common.int8_rescue import near_boundary
from contract.specs import (
    CLASSIFIER_ONNX,
    INLINE_ENCODER_PARAMETER,
    RESCUE_ENCODER_PARAMETER,
    RESCUE_MARGIN_PARAMETER,
)
from serving.onnx_runner import BatchedOnnxRunner, runner_from_parameters

Feeds = Mapping[str, np.ndarray]


class InlineEncoder:
    def __init__(self, fast: BatchedOnnxRunner, exact: BatchedOnnxRunner | None = None, margin: float = 0.0) -> None:
        self.fast = fast
        self.exact = exact if margin > 0 else None
        self.margin = margin
        self.logits_name = CLASSIFIER_ONNX.outputs[0].name
        self.rescued_rows = 0
        """Rows re-encoded in fp32 since start (benchmarks and tests read it)."""

    @classmethod
    def from_parameters(
        cls, version_dir: Path, parameters: Mapping[str, str], spinning: bool = False
    ) -> InlineEncoder | None:
        """None when the config runs no encoder in `classify` (it calls `classifier_onnx` over BLS)."""
        graph = parameters.get(INLINE_ENCODER_PARAMETER)
        if not graph:
            return None
        fast = runner_from_parameters(version_dir / graph, parameters, spinning)
        rescue = parameters.get(RESCUE_ENCODER_PARAMETER)
        exact = runner_from_parameters(version_dir / rescue, parameters, spinning) if rescue else None
        return cls(fast, exact, float(parameters.get(RESCUE_MARGIN_PARAMETER, "0")) if rescue else 0.0)

    def logits(self, feeds: Feeds) -> np.ndarray:
        """One runner call for the batch (it splits it by length itself), then fp32 for the rows
        near the boundary, if any."""
        logits = self.fast.run([feeds])[0][self.logits_name]
        if self.exact is None:
            return logits
        rows = near_boundary(logits, self.margin)
        if rows.size:
            logits = np.array(logits, copy=True)
            logits[rows] = self.exact.run([{k: v[rows] for k, v in feeds.items()}])[0][self.logits_name]
            self.rescued_rows += int(rows.size)
        return logits
