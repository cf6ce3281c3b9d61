"""ONNX Runtime execution of a batch of Triton requests (plain numpy; no Triton imports).

Triton's dynamic batcher hands a python model a list of requests. We merge them into as few
ONNX Runtime calls as possible: requests whose tensors agree on every non-batch dim are stacked
along dim 0; inputs listed as "pad along axis 1" (token ids, masks) are right-padded to the
longest so that texts of different lengths still share one call.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort  # noqa: F401  (type of BatchedOnnxRunner.session)

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


def _pad_axis1(arrays: list[np.ndarray], value: int = 0) -> list[np.ndarray]:
    width = max(a.shape[1] for a in arrays)
    out = []
    for a in arrays:
        if a.shape[1] < width:
            pad = [(0, 0)] * a.ndim
            pad[1] = (0, width - a.shape[1])
            a = np.pad(a, pad, constant_values=value)
        out.append(a)
    return out


class BatchedOnnxRunner:
    """Runs many requests' feeds through one session, merging compatible ones."""

    def __init__(self, session: ort.InferenceSession, pad_axis1: Sequence[str] = ()) -> None:
        self.session = session
        self.pad_axis1 = frozenset(pad_axis1)
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_ranks = {i.name: len(i.shape) for i in session.get_inputs()}

    def _conform(self, feeds: Feeds) -> Feeds:
        """Per-item scalars travel as [B, 1] (Triton dims [1]); a graph taking [B] gets them flat."""
        return {
            k: v.reshape(v.shape[0]) if self.input_ranks.get(k) == 1 and v.ndim == 2 and v.shape[1] == 1 else v
            for k, v in feeds.items()
            if k in self.input_ranks  # e.g. `guidance` for a FLUX without guidance embedding
        }

    def _signature(self, feeds: Feeds) -> tuple:
        return tuple(
            (name, arr.dtype.str, arr.shape[2:] if name in self.pad_axis1 else arr.shape[1:])
            for name, arr in sorted(feeds.items())
        )

    def run(self, requests: Sequence[Feeds]) -> list[Feeds]:
        requests = [self._conform(r) for r in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, feeds in enumerate(requests):
            groups[self._signature(feeds)].append(i)
        results: list[Feeds | None] = [None] * len(requests)
        for idxs in groups.values():
            merged: Feeds = {}
            for name in requests[idxs[0]]:
                parts = [requests[i][name] for i in idxs]
                if name in self.pad_axis1 and len(parts) > 1:
                    parts = _pad_axis1(parts)
                merged[name] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
            outputs = self.session.run(self.output_names, merged)
            offset = 0
            for i in idxs:
                n = next(iter(requests[i].values())).shape[0]
                results[i] = {k: v[offset : offset + n] for k, v in zip(self.output_names, outputs)}
                offset += n
        return [r for r in results if r is not None]
