"""ONNX Runtime sessions built one way for every user: Triton's python models, export parity
checks, the in-process benchmarks and pipelines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime as ort

CPU_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)


def session_options(intra_op_threads: int = 1, spinning: bool = False) -> ort.SessionOptions:
    """Full graph optimisation, one inter-op thread, quiet logs.

    `spinning=False`: several model instances share few cores, and threads that spin between
    batches burn the CPU another process needs, so they sleep instead. intra_op_threads=0 lets ONNX
    Runtime pick (all cores).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def make_session(
    path: Path, intra_op_threads: int = 1, providers: Sequence[str] | None = None, spinning: bool = False
) -> ort.InferenceSession:
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), session_options(intra_op_threads, spinning), providers=list(providers or CPU_PROVIDERS)
    )
