"""GPU target: apply a LoRA to a built TensorRT engine by refitting the weights it changes.

The same layer -> initializer map that patches ONNX files (export.flux.weight_map) names the
weights of a TensorRT engine built from that ONNX with `BuilderFlag.REFIT`: TensorRT's ONNX parser
names each refittable weight after its ONNX initializer. A LoRA then becomes
`Refitter.set_named_weights(initializer, W')` for the changed initializers only (the whole
initializer, also when q/k/v are fused in it), then `refit_cuda_engine()`: no rebuild, no
re-export, the engine's tactics are kept.

TensorRT cannot be installed on the CPU machines this project is developed on: the module imports
it lazily, `refit_plan` (pure numpy/torch, tested against the ONNX graph) decides what is set,
and `refit_engine` is exercised only where TensorRT and a GPU exist (tests skip otherwise).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from export.flux.weight_map import WeightMap
from export.flux.weight_patch import LayerDelta, patched_tensors

log = logging.getLogger(__name__)


def refit_plan(base_dir: Path, deltas: dict[str, LayerDelta]) -> dict[str, torch.Tensor]:
    """TensorRT weight name (= ONNX initializer name) -> its new value, base + delta, in the
    initializer's own layout and dtype (what the parser gave the engine)."""
    weight_map = WeightMap.load(base_dir)
    return {
        name: value.contiguous() for name, (_, value) in patched_tensors(Path(base_dir), weight_map, deltas).items()
    }


def _trt_weights(trt, value: torch.Tensor):  # noqa: ANN001 (tensorrt is imported lazily)
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16: hand TensorRT the raw buffer
        return trt.Weights(trt.bfloat16, value.data_ptr(), value.numel())
    return trt.Weights(np.ascontiguousarray(value.numpy()))


def refit_engine(engine_bytes: bytes, weights: dict[str, torch.Tensor]) -> bytes:
    """Refit a serialized engine (built with BuilderFlag.REFIT from the base ONNX) with `weights`
    (from refit_plan; the tensors must stay alive until this returns, TensorRT reads their
    buffers during refit_cuda_engine); returns the serialized engine for the new Triton version."""
    import tensorrt as trt  # only on the GPU target

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise RuntimeError("TensorRT could not deserialize the engine")
    refitter = trt.Refitter(engine, logger)
    known = set(refitter.get_all_weights())
    unknown = sorted(set(weights) - known)
    if unknown:
        raise KeyError(f"engine has no refittable weights named {unknown[:5]} (built without BuilderFlag.REFIT?)")
    for name, value in weights.items():
        if not refitter.set_named_weights(name, _trt_weights(trt, value)):
            raise RuntimeError(f"TensorRT refused new weights for {name} {value.shape}")
    missing = refitter.get_missing_weights()
    if missing:  # weights TensorRT needs together with the ones set (e.g. fused by the builder)
        raise RuntimeError(f"refit needs these weights too: {list(missing)[:5]}")
    if not refitter.refit_cuda_engine():
        raise RuntimeError("TensorRT refit failed")
    log.info("refitted %d weights", len(weights))
    return bytes(engine.serialize())
