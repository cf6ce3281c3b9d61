"""The int8-or-fp32 decision for the CPU classifier."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from common.ort_session import make_session
from export.classifier_precision import choose, quantize_int8, split_skip_layer_norm


def test_int8_within_half_a_point_is_served() -> None:
    served, reason = choose("auto", 0.990, 0.986)
    assert served == "int8" and "within" in reason


def test_int8_more_than_half_a_point_worse_falls_back_with_reason() -> None:
    served, reason = choose("auto", 0.990, 0.980)
    assert served == "fp32" and "1.00 points below" in reason


def test_settings_force_either_and_unmeasured_stays_fp32() -> None:
    assert choose("fp32", 0.9, 0.95)[0] == "fp32"
    assert choose("int8", 0.99, 0.5)[0] == "int8"
    assert choose("auto", None, None) == ("fp32", "no test split next to the model to measure int8 against")


H = 8


def _skip_layer_norm_model(with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(1, 0.1, H).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, H).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(0, 0.1, H).astype(np.float32), "bias"),
    ]
    inputs = ["x", "skip", "gamma", "beta"] + (["bias"] if with_bias else [])
    node = helper.make_node("SkipLayerNormalization", inputs, ["y"], domain="com.microsoft", epsilon=1e-5)
    graph = helper.make_graph(
        [node, helper.make_node("Relu", ["y"], ["out"])],
        "sln",
        # (batch, sequence, hidden) as in the encoder: ORT fuses Add + LayerNormalization only in 3-D
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "sequence", H]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", H])],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


@pytest.mark.parametrize("with_bias", [True, False])
def test_split_skip_layer_norm_computes_what_the_fused_node_did(tmp_path: Path, with_bias: bool) -> None:
    fused = _skip_layer_norm_model(with_bias)
    onnx.save(fused, tmp_path / "fused.onnx")
    split = _skip_layer_norm_model(with_bias)
    assert split_skip_layer_norm(split) == 1
    assert [n.op_type for n in split.graph.node] == ["Add"] * (2 if with_bias else 1) + ["LayerNormalization", "Relu"]
    onnx.checker.check_model(split)
    onnx.save(split, tmp_path / "split.onnx")
    rng = np.random.default_rng(1)
    feeds = {n: rng.normal(size=(2, 5, H)).astype(np.float32) for n in ("x", "skip")}
    want = make_session(tmp_path / "fused.onnx").run(None, feeds)[0]
    got = make_session(tmp_path / "split.onnx").run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rebuilding_int8_leaves_hard_linked_published_copies_alone(tmp_path: Path) -> None:
    """Published versions hard-link the build's graph; a rebuild must not write through the link."""
    src = tmp_path / "fp32.onnx"
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(H, H)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, H])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    dst = tmp_path / "int8.onnx"
    dst.write_bytes(b"the graph an earlier version serves")
    published = tmp_path / "published_model.onnx"
    os.link(dst, published)
    quantize_int8(src, dst)
    assert published.read_bytes() == b"the graph an earlier version serves"
    assert "MatMulInteger" in {n.op_type for n in onnx.load(dst).graph.node}
    assert not list(tmp_path.glob("*.partial*"))
