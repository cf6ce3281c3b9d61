"""int8's fp32 second opinion: which rows it re-encodes, and that only they change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from common.int8_rescue import near_boundary
from contract.specs import CLASSIFIER_ONNX, INLINE_ENCODER_PARAMETER, RESCUE_ENCODER_PARAMETER, RESCUE_MARGIN_PARAMETER
from serving.classify_encoder import InlineEncoder

LOGITS = CLASSIFIER_ONNX.outputs[0].name


def test_near_boundary_picks_rows_whose_top_two_logits_are_close() -> None:
    logits = np.array([[0.0, 7.0], [1.0, -1.0], [2.0, 2.5], [-3.0, 2.9]], np.float32)
    assert near_boundary(logits, 6.0).tolist() == [1, 2, 3]
    assert near_boundary(logits, 1.0).tolist() == [2]
    assert near_boundary(logits, 0.0).tolist() == []
    assert near_boundary(np.zeros((0, 2), np.float32), 6.0).tolist() == []


def _encoder_graph(path: Path, scale: float) -> Path:
    """logits = [0, scale * (sum of the row's real token ids)]: the rows' margins are known."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", 2])
    nodes = [
        helper.make_node("Mul", ["input_ids", "attention_mask"], ["real"]),
        helper.make_node("Cast", ["real"], ["real_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["real_f", "axis1"], ["total"], keepdims=1),
        helper.make_node("Mul", ["total", "scale"], ["image"]),
        helper.make_node("Mul", ["total", "zero"], ["chat"]),
        helper.make_node("Concat", ["chat", "image"], [LOGITS], axis=1),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(scale, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    graph = helper.make_graph(nodes, "enc", [ids, mask], [out], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture()
def version_dir(tmp_path: Path) -> Path:
    _encoder_graph(tmp_path / "encoder.onnx", 1.0)  # "int8": margin = sum of ids
    _encoder_graph(tmp_path / "encoder_fp32.onnx", -1.0)  # "fp32": the opposite answer, to see who spoke
    return tmp_path


PARAMS = {
    INLINE_ENCODER_PARAMETER: "encoder.onnx",
    "pad_axis1": "input_ids,attention_mask",
    "length_buckets": "attention_mask",
    "call_cost_tokens": "0",
}


def _feeds() -> dict[str, np.ndarray]:
    # margins 9, 2, 5 and 1 (the last two rows padded)
    ids = np.array([[4, 5, 0], [1, 1, 0], [5, 0, 0], [1, 0, 0]], np.int64)
    return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}


def test_only_rows_under_the_margin_take_the_fp32_answer(version_dir: Path) -> None:
    params = {**PARAMS, RESCUE_ENCODER_PARAMETER: "encoder_fp32.onnx", RESCUE_MARGIN_PARAMETER: "6"}
    encoder = InlineEncoder.from_parameters(version_dir, params)
    assert encoder is not None
    logits = encoder.logits(_feeds())
    assert logits[:, 1].tolist() == [9.0, -2.0, -5.0, -1.0]
    assert encoder.rescued_rows == 3


def test_without_a_rescue_the_int8_answer_stands(version_dir: Path) -> None:
    plain = InlineEncoder.from_parameters(version_dir, PARAMS)
    assert plain is not None and plain.exact is None
    assert plain.logits(_feeds())[:, 1].tolist() == [9.0, 2.0, 5.0, 1.0]
    zero = InlineEncoder.from_parameters(
        version_dir, {**PARAMS, RESCUE_ENCODER_PARAMETER: "encoder_fp32.onnx", RESCUE_MARGIN_PARAMETER: "0"}
    )
    assert zero is not None and zero.logits(_feeds())[:, 1].tolist() == [9.0, 2.0, 5.0, 1.0]
    assert InlineEncoder.from_parameters(version_dir, {}) is None  # BLS: no encoder in classify
