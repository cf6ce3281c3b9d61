"""Patch a LoRA into the int8 transformer graph by requantizing only the tensors it changes.

The patch is computed in fp32 from the base export (`W' = W + scale * (B @ A)`,
export.flux.weight_patch), then each changed initializer is quantized as `quantize_dynamic` did
it in the whole graph: the quantizer's per-weight arithmetic (Gemm -> MatMul over
`<W>_Transposed`, per-channel scales, symmetric int8) depends only on the weight and its
consumer. For MatMul/Gemm weights that arithmetic runs on whole arrays (`per_channel_int8`);
any other layout goes through ONNX Runtime's own quantizer on a graph of just the nodes that
consume the changed initializers. Either way the result is bit for bit what quantizing the whole
patched fp32 graph gives (tests/unit/test_int8_patch.py compares every weight file).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.flux.transformer_precision import ONNX_FILE, QUANT_SUFFIXES, TRANSPOSED, quantize_model
from export.flux.weight_map import _tensor_bytes, initializer_locations

PATCHABLE_CONSUMERS = ("MatMul", "Gemm")


class NotRequantizable(ValueError):
    """The int8 graph holds a changed weight where a per-tensor rewrite cannot reach it."""


def derived_names(name: str) -> tuple[str, ...]:
    """Every initializer the int8 graph may hold for fp32 initializer `name`."""
    stems = (name, name + TRANSPOSED)
    return (*stems, *(s + suffix for s in stems for suffix in QUANT_SUFFIXES))


def _consumer_graph(fp32_graph: onnx.ModelProto, new: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A model of the fp32 graph's nodes that read the changed initializers, nothing else."""
    nodes, inputs, outputs = [], {}, []
    for node in fp32_graph.graph.node:
        if not any(i in new for i in node.input):
            continue
        if node.op_type not in PATCHABLE_CONSUMERS:
            raise NotRequantizable(f"{node.op_type} node {node.name!r} reads a patched weight")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        nodes.append(copy)
        for i in node.input:
            if i and i not in new:
                inputs[i] = helper.make_tensor_value_info(i, onnx.TensorProto.FLOAT, None)
        outputs += [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in node.output]
    graph = helper.make_graph(
        nodes,
        "requantize",
        list(inputs.values()),
        outputs,
        initializer=[numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in new.items()],
    )
    return helper.make_model(graph, opset_imports=list(fp32_graph.opset_import), ir_version=fp32_graph.ir_version)


def per_channel_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(quantized, scale, zero point) of a MatMul weight (in, out), one channel per column:
    ORT's per-channel symmetric QInt8 arithmetic (quant_utils.compute_scale_zp and
    quantize_nparray, applied column by column by base_quantizer) in whole-array numpy, the same
    dtypes at every step. ORT's column loop is slow for a LoRA's many columns (docs/benchmarks.md,
    "Generation"); this is bit for bit the same (tests/unit/test_int8_patch.py checks it against ORT)."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.INT8, reduce_range=False, symmetric=True)
    low, high = get_qmin_qmax_for_qType(onnx.TensorProto.INT8)  # quantize_nparray clips to the full range
    w = np.asarray(w, dtype=np.float32)
    zero = np.float32(0)
    absmax = np.maximum(np.abs(np.minimum(w.min(axis=0), zero)), np.abs(np.maximum(w.max(axis=0), zero)))
    scale64 = (absmax.astype(np.float64) - (-absmax).astype(np.float64)) / (np.float64(qmax) - np.float64(qmin))
    degenerate = scale64 < np.finfo(np.float32).tiny
    scale = np.where(degenerate, np.float32(1.0), scale64.astype(np.float32))
    zero_point = np.full(w.shape[1], np.round((qmin + qmax) / np.float64(2.0)), dtype=np.int8)
    zero_point[degenerate] = 0
    q = np.round(w / scale[None, :]) + zero_point[None, :]
    np.clip(q, low, high, out=q)
    return q.astype(np.int8), scale, zero_point


def _whole_array(fp32_graph: onnx.ModelProto, new: dict[str, np.ndarray]) -> dict[str, bytes] | None:
    """requantize's result for the layouts it knows (MatMul B; Gemm B, transposed or not, alpha 1),
    None for anything else (then ORT's own quantizer runs)."""
    out: dict[str, bytes] = {}
    seen: set[str] = set()
    for node in fp32_graph.graph.node:
        for i, name in enumerate(node.input):
            if name not in new:
                continue
            if name in seen or i != 1 or node.op_type not in PATCHABLE_CONSUMERS:
                return None  # read twice, or not as the weight of a matrix product
            seen.add(name)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            stem, w = name, new[name]
            if node.op_type == "Gemm":
                if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                    return None
                if attrs.get("transB", 0):
                    stem, w = name + TRANSPOSED, np.ascontiguousarray(w.T)
            q, scale, zero_point = per_channel_int8(w)
            out |= {stem + "_quantized": q.tobytes(), stem + "_scale": scale.tobytes()}
            out[stem + "_zero_point"] = zero_point.tobytes()
    return out if seen == set(new) else None


def requantize(fp32_graph: onnx.ModelProto, new: dict[str, np.ndarray]) -> dict[str, bytes]:
    """int8-graph initializer name -> bytes, for everything quantize_dynamic derives from the
    changed fp32 initializers `new` (name -> patched array)."""
    fast = _whole_array(fp32_graph, new)
    return fast if fast is not None else requantize_with_ort(fp32_graph, new)


def requantize_with_ort(fp32_graph: onnx.ModelProto, new: dict[str, np.ndarray]) -> dict[str, bytes]:
    """requantize by ORT's own quantizer on the consumers of the changed initializers."""
    wanted = {d for n in new for d in derived_names(n)}
    with tempfile.TemporaryDirectory(prefix="fluxserve-requant-") as tmp:
        out = Path(tmp) / ONNX_FILE
        quantize_model(_consumer_graph(fp32_graph, new), out)
        model = onnx.load(str(out), load_external_data=False)
        return {t.name: _tensor_bytes(t, Path(tmp)) for t in model.graph.initializer if t.name in wanted}


def int8_targets(int8_graph: onnx.ModelProto, names: set[str]) -> dict[str, str]:
    """int8-graph initializer -> its file, for every initializer derived from `names`; raises
    when one is stored inside model.onnx (the graph file is shared, never rewritten)."""
    locations = initializer_locations(int8_graph)
    present = {t.name for t in int8_graph.graph.initializer}
    out = {}
    for name in names:
        for d in derived_names(name):
            if d in present:
                if d not in locations:
                    raise NotRequantizable(f"{d} is stored inside the int8 model.onnx")
                out[d] = locations[d]
    return out


def patched_int8_files(int8_dir: Path, fp32_graph: onnx.ModelProto, new: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Relative file (inside the int8 folder) -> new bytes, for the int8 graph in `int8_dir`."""
    int8_graph = onnx.load(str(Path(int8_dir) / ONNX_FILE), load_external_data=False)
    targets = int8_targets(int8_graph, set(new))
    values = requantize(fp32_graph, new)
    missing = sorted(set(targets) - set(values))
    if missing:
        raise NotRequantizable(f"requantizing did not produce {missing[:3]}")
    quantized = {n for n in new if any(n + s in targets or n + TRANSPOSED + s in targets for s in QUANT_SUFFIXES)}
    unquantized = set(new) - quantized - set(targets)
    if unquantized:
        raise NotRequantizable(f"patched weights absent from the int8 graph: {sorted(unquantized)[:3]}")
    return {targets[n]: values[n] for n in targets}
