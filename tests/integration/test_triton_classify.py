"""`classify` on a real Triton server, over gRPC, with the Python client."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.sweep import copy_classifier_models
from client.triton_client import TritonClient
from common.ort_session import CPU_PROVIDERS, session_options
from contract.errors import InvalidInputError
from contract.specs import CLASSIFIER_ONNX, CLASSIFY, INLINE_ENCODER_PARAMETER, LABELS, THRESHOLD_PARAMETER
from export.deployments import ExportSettings, classifier_deployments
from export.triton_config import parse_config
from publish.repository import latest_manifest, versions, write_config
from runtime.launcher import TritonStartError
from serving.classify_pipeline import ClassifyPipeline, calibrated_softmax
from tests.conftest import MODEL_REPOSITORY, start_triton, triton_metric

pytestmark = pytest.mark.integration

PROTOTYPE_EXAMPLES = {
    "can I see you in the kitchen?": "image_request",
    "make an image of you in Paris": "image_request",
    "see you tomorrow": "conversation",
}


def test_prototype_examples(triton) -> None:
    with TritonClient(triton.grpc_url) as client:
        results = client.classify(list(PROTOTYPE_EXAMPLES))
    for (text, expected), r in zip(PROTOTYPE_EXAMPLES.items(), results):
        assert r.label == expected, (text, r)
        assert abs(sum(r.scores.values()) - 1) < 1e-5
        assert r.score == max(r.scores.values())


def test_batch_equals_singles(triton) -> None:
    texts = ["selfie?", "another one but at night", "I took a nice picture yesterday", "a cyberpunk city at dusk, 8k"]
    with TritonClient(triton.grpc_url) as client:
        batch = client.classify(texts)
        singles = [client.classify([t])[0] for t in texts]
    # int8: a text's scores move slightly with its batch-mates (measured ~1e-4).
    atol = _atol()
    for b, s in zip(batch, singles):
        assert b.label == s.label
        # Padding to the batch's longest text must not change the answer (attention mask).
        assert np.allclose([b.scores[k] for k in LABELS], [s.scores[k] for k in LABELS], atol=atol)


def test_empty_text_is_invalid_argument_from_server(triton) -> None:
    import tritonclient.grpc as g

    raw = g.InferenceServerClient(triton.grpc_url)
    inp = g.InferInput(CLASSIFY.inputs[0].name, [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b"   "]], dtype=np.object_))
    with pytest.raises(Exception) as info:
        raw.infer(CLASSIFY.name, [inp])
    assert "INVALID_ARGUMENT" in str(info.value.status()) and "empty" in info.value.message()
    # The model keeps serving after a bad request.
    with TritonClient(triton.grpc_url) as client:
        assert client.classify(["hello there"])[0].label in LABELS
        with pytest.raises(InvalidInputError):
            client.classify([""])


def test_concurrent_requests_are_batched(triton) -> None:
    """Triton's dynamic batcher merges concurrent requests: executions < inferences."""
    texts = [
        f"message number {i}: can you show me a photo of a {w}?"
        for i, w in enumerate(["cat", "dog", "boat", "tree"] * 16)
    ]
    before_inf = triton_metric(triton.metrics_url, "nv_inference_count", CLASSIFY.name)
    before_exec = triton_metric(triton.metrics_url, "nv_inference_exec_count", CLASSIFY.name)
    with TritonClient(triton.grpc_url) as client, ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda t: client.classify([t])[0], texts))
    assert all(r.label in LABELS for r in results)
    inferences = triton_metric(triton.metrics_url, "nv_inference_count", CLASSIFY.name) - before_inf
    executions = triton_metric(triton.metrics_url, "nv_inference_exec_count", CLASSIFY.name) - before_exec
    assert inferences == len(texts)
    assert executions < inferences, f"no batching: {executions} executions for {inferences} inferences"


def test_launcher_surfaces_model_load_error(tmp_path: Path) -> None:
    """A model that fails to load stops start-up with Triton's own message."""
    repo = tmp_path / "repo"
    shutil.copytree(MODEL_REPOSITORY / "classify", repo / "classify", ignore=shutil.ignore_patterns("tokenizer"))
    version = max(int(p.name) for p in (repo / "classify").iterdir() if p.name.isdigit())
    (repo / "classify" / str(version) / "labels.json").write_text(json.dumps({"labels": ["a", "b"]}))
    with pytest.raises(TritonStartError) as info:
        start_triton(repo, log_name="test-triton-broken.log")
    assert "classify" in str(info.value)


SAMPLE = [
    "selfie?",
    "can you show me the way to the station?",
    "I'll show you around when you visit",
    "draw me a lighthouse in a storm, oil painting style, dramatic waves crashing on the rocks",
    "see you tomorrow",
    "ok",
]


def _scores(results: list) -> np.ndarray:
    return np.array([[r.scores[k] for k in LABELS] for r in results])


def _atol() -> float:
    """int8 is dynamically quantized (activation scales per call); fp32 only reorders sums."""
    precision = (latest_manifest(MODEL_REPOSITORY, CLASSIFIER_ONNX.name) or {}).get("report", {}).get("precision") or {}
    return 1e-2 if precision.get("served") == "int8" else 1e-4


def _onnx_scores(grpc_url: str, texts: list[str]) -> np.ndarray:
    """`classifier_onnx` called directly with `classify`'s tokenizer, then its calibrated softmax."""
    import tritonclient.grpc as g

    pipeline = ClassifyPipeline(MODEL_REPOSITORY / CLASSIFY.name / str(versions(MODEL_REPOSITORY, CLASSIFY.name)[-1]))
    inputs = []
    for name, arr in pipeline.tokenize(texts).items():
        inputs.append(g.InferInput(name, list(arr.shape), "INT64"))
        inputs[-1].set_data_from_numpy(arr)
    logits = (
        g.InferenceServerClient(grpc_url).infer(CLASSIFIER_ONNX.name, inputs).as_numpy(CLASSIFIER_ONNX.outputs[0].name)
    )
    return calibrated_softmax(logits, pipeline.labels.temperature)


def test_cpu_classify_runs_the_served_graph_itself(triton) -> None:
    """CPU default: `classify` encodes in its own process (no BLS call, so `classifier_onnx` sees
    no traffic) with the very graph `classifier_onnx` serves, and answers as that graph does."""
    cfg = parse_config((MODEL_REPOSITORY / CLASSIFY.name / "config.pbtxt").read_text())
    encoder_file = cfg.parameters[INLINE_ENCODER_PARAMETER].string_value
    cls_files = (latest_manifest(MODEL_REPOSITORY, CLASSIFY.name) or {})["files"]
    assert (
        cls_files[encoder_file]
        == (latest_manifest(MODEL_REPOSITORY, CLASSIFIER_ONNX.name) or {})["files"]["model.onnx"]
    )

    before = triton_metric(triton.metrics_url, "nv_inference_count", CLASSIFIER_ONNX.name)
    with TritonClient(triton.grpc_url) as client:
        served = _scores(client.classify(SAMPLE))
    assert triton_metric(triton.metrics_url, "nv_inference_count", CLASSIFIER_ONNX.name) == before
    direct = _onnx_scores(triton.grpc_url, SAMPLE)
    assert np.allclose(served, direct, atol=_atol()), np.abs(served - direct).max()


def test_bls_encoder_answers_as_the_inline_one(triton, tmp_path: Path) -> None:
    """`classify_encoder=bls` (the GPU target's path, and a CPU option): the same `classify`
    version calls `classifier_onnx` per merged batch, and answers as the inline default does."""
    repo = tmp_path / "repo"
    copy_classifier_models(MODEL_REPOSITORY, repo)
    published = parse_config((repo / CLASSIFY.name / "config.pbtxt").read_text())
    dep = classifier_deployments(ExportSettings(classify_encoder="bls"))[CLASSIFY.name]
    assert INLINE_ENCODER_PARAMETER not in dep.parameters
    kept = {k: v.string_value for k, v in published.parameters.items() if k == THRESHOLD_PARAMETER}
    write_config(repo, replace(dep, parameters={**dep.parameters, **kept}), "cpu")
    with TritonClient(triton.grpc_url) as client:
        inline = _scores(client.classify(SAMPLE))
    server = start_triton(repo, (CLASSIFY.name, CLASSIFIER_ONNX.name), log_name="test-triton-bls.log")
    try:
        with TritonClient(server.grpc_url) as client:
            via_bls = client.classify(SAMPLE)
        assert triton_metric(server.metrics_url, "nv_inference_count", CLASSIFIER_ONNX.name) == len(SAMPLE)
    finally:
        server.stop()
    assert np.allclose(_scores(via_bls), inline, atol=_atol()), np.abs(_scores(via_bls) - inline).max()


def test_served_cpu_graph_runs_layer_norms_unfused(tmp_path: Path) -> None:
    """The export splits SkipLayerNormalization (ORT's CPU kernel for it is ~5x slower than Add +
    LayerNormalization); ORT's load-time fusions must not put it back in what the session runs."""
    manifest = latest_manifest(MODEL_REPOSITORY, CLASSIFIER_ONNX.name) or {}
    if not (manifest.get("report") or {}).get("precision"):
        pytest.skip("not the CPU target's graph")
    graph = MODEL_REPOSITORY / CLASSIFIER_ONNX.name / str(versions(MODEL_REPOSITORY, CLASSIFIER_ONNX.name)[-1])
    opts = session_options()
    opts.optimized_model_filepath = str(tmp_path / "as_run.onnx")
    ort.InferenceSession(str(graph / "model.onnx"), opts, providers=list(CPU_PROVIDERS))
    ops = {n.op_type for n in onnx.load(tmp_path / "as_run.onnx").graph.node}
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops, sorted(ops)
    assert {"QAttention", "Attention"} & ops, sorted(ops)  # the split kept the attention fusion
