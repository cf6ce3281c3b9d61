"""ONNX Runtime execution of a batch of Triton requests (plain numpy; no Triton imports).

Triton's dynamic batcher hands a python model a list of requests. We merge them into as few
ONNX Runtime calls as possible: requests whose tensors agree on every non-batch dim are stacked
along dim 0; inputs listed as "pad along axis 1" (token ids, masks) are right-padded to the
longest so that texts of different lengths still share one call.

Padding is paid for: the encoder's cost grows with rows x padded length, and a merged chat batch
carries much of it (docs/benchmarks.md, "Where a /classify request's CPU goes"). With
`length_buckets` set (a right-padded 0/1 mask input,
for graphs whose outputs have no sequence axis, like the classifier's logits), the merged rows
are regrouped by real length into the few calls that minimise rows x width plus a fixed cost per
call, and each call is cut to its own longest row.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.ort_session import make_session

if TYPE_CHECKING:  # the gpu-torch components run this merging without onnxruntime installed
    import onnxruntime as ort

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


def length_groups(lengths: np.ndarray, call_cost_tokens: float) -> list[np.ndarray]:
    """Row indices grouped so that sum(rows x longest row) + call_cost_tokens x calls is least.

    Exact over the distinct lengths (sorted, so an optimal grouping is contiguous there): a
    dynamic programme over at most a few dozen values, no per-row Python work.
    """
    order = np.argsort(lengths, kind="stable")
    distinct, counts = np.unique(lengths[order], return_counts=True)
    cum = np.concatenate(([0], np.cumsum(counts))).tolist()
    widths = distinct.tolist()
    k = len(widths)
    best = [0.0] + [float("inf")] * k
    cut = [0] * (k + 1)
    for j in range(1, k + 1):
        w = widths[j - 1]
        for i in range(j):
            c = best[i] + call_cost_tokens + (cum[j] - cum[i]) * w
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds = []
    j = k
    while j > 0:
        bounds.append((cum[cut[j]], cum[j]))
        j = cut[j]
    return [order[a:b] for a, b in reversed(bounds)]


class BatchedOnnxRunner:
    """Runs many requests' feeds through one session, merging compatible ones."""

    def __init__(
        self,
        session: ort.InferenceSession,
        pad_axis1: Sequence[str] = (),
        length_buckets: str | None = None,
        call_cost_tokens: float = 16.0,
    ) -> None:
        self.session = session
        self.pad_axis1 = frozenset(pad_axis1)
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_ranks = {i.name: len(i.shape) for i in session.get_inputs()}
        if length_buckets is not None and length_buckets not in self.pad_axis1:
            raise ValueError(f"length_buckets={length_buckets!r} must be one of the padded inputs {sorted(pad_axis1)}")
        self.length_buckets = length_buckets
        self.call_cost_tokens = call_cost_tokens
        """What one more call costs, in padded tokens' worth of encoder work (per-call overhead)."""

    def _run_merged(self, merged: Feeds) -> list[np.ndarray]:
        if self.length_buckets is None:
            return self.session.run(self.output_names, merged)
        mask = merged[self.length_buckets]
        lengths = mask.sum(axis=1)
        right_padded = bool((mask[np.arange(mask.shape[0]), np.maximum(lengths - 1, 0)] == 1).all())
        groups = length_groups(lengths, self.call_cost_tokens) if right_padded else []
        if len(groups) <= 1 and (not right_padded or int(lengths.max()) == mask.shape[1]):
            return self.session.run(self.output_names, merged)
        outputs: list[np.ndarray] | None = None
        for rows in groups:
            width = int(lengths[rows].max())
            feeds = {k: v[rows, :width] if k in self.pad_axis1 else v[rows] for k, v in merged.items()}
            part = self.session.run(self.output_names, feeds)
            if outputs is None:
                outputs = [np.empty((mask.shape[0], *o.shape[1:]), o.dtype) for o in part]
            for out, o in zip(outputs, part):
                out[rows] = o
        assert outputs is not None
        return outputs

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
            outputs = self._run_merged(merged)
            offset = 0
            for i in idxs:
                n = next(iter(requests[i].values())).shape[0]
                results[i] = {k: v[offset : offset + n] for k, v in zip(self.output_names, outputs)}
                offset += n
        return [r for r in results if r is not None]


def config_parameters(config: dict) -> dict[str, str]:
    """A Triton model config's (JSON form) `parameters` as plain strings."""
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def runner_from_parameters(onnx_path: Path, parameters: Mapping[str, str], spinning: bool = False) -> BatchedOnnxRunner:
    """A runner configured by a Triton config's string parameters: `intra_op_threads` (default 1),
    `pad_axis1` (comma-separated input names), `length_buckets` and `call_cost_tokens`.

    One reader for both models that run the classifier's encoder (`classifier_onnx`, and
    `classify` when it runs the encoder in its own process) and the in-process benchmark, so the
    knobs mean the same in each. `spinning`: see common/ort_session.py (off where instances share cores).
    """
    threads = int(parameters.get("intra_op_threads", "1"))
    pad = [p for p in parameters.get("pad_axis1", "").split(",") if p]
    buckets = parameters.get("length_buckets", "") or None
    cost = float(parameters.get("call_cost_tokens", "16"))
    return BatchedOnnxRunner(make_session(onnx_path, threads, spinning=spinning), pad, buckets, cost)
