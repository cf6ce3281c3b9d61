"""`classify` on a real Triton server, over gRPC, with the Python client."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from client.contract import CLASSIFY, LABELS
from client.errors import InvalidInputError
from client.triton_client import TritonClient
from export.repository import latest_manifest
from runtime.launcher import TritonStartError
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
    # int8 is dynamically quantized: activation scales are computed per batch, so a text's scores
    # move slightly with its batch-mates (measured ~1e-4); fp32 only reorders sums.
    precision = (latest_manifest(MODEL_REPOSITORY, "classifier_onnx") or {}).get("report", {}).get("precision") or {}
    atol = 1e-2 if precision.get("served") == "int8" else 1e-4
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
