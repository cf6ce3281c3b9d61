"""`generate` on a real Triton server, and /generate through the real facade (the image it serves,
and a failure inside Triton mid-request). The facade's HTTP rules for /generate (validation, raw
bytes, output formats, seeds, trigger words) are checked in-process in tests/unit/facade/."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from client.control_key import control_headers
from client.triton_client import TritonClient
from common.flux_assets import read_max_sequence_length
from contract.specs import FLUX_TRANSFORMER, GENERATE, GenerateParams
from export.flux.lora import load_pipeline
from tests.conftest import MODEL_REPOSITORY, start_facade, triton_metric

pytestmark = pytest.mark.integration

PROMPT = "Super Realism, a red fox in snow"
SMALL = {"width": 64, "height": 64, "steps": 3}


def provenance() -> dict:
    version = max(int(p.name) for p in (MODEL_REPOSITORY / GENERATE.name).iterdir() if p.name.isdigit())
    manifest = json.loads((MODEL_REPOSITORY / GENERATE.name / str(version) / "fluxserve_manifest.json").read_text())
    return manifest["provenance"]


@pytest.fixture(scope="module")
def gen_client(triton):
    with TritonClient(triton.grpc_url, timeout_s=300) as c:
        yield c


@pytest.fixture(scope="module")
def target_client(target_triton):
    """A client of each target's Triton in turn (tests/integration/conftest.py: cpu, gpu-torch)."""
    with TritonClient(target_triton.grpc_url, timeout_s=300) as c:
        yield c


def test_served_image_matches_diffusers_pipeline(target_client) -> None:
    """Same checkpoint, LoRA (fused), prompt, seed, size and steps as diffusers' FluxPipeline in PyTorch."""
    prov = provenance()
    pipe = load_pipeline(prov["checkpoint"], prov["lora"], lora_scale=prov["lora_scale"])
    checkpoint_msl = read_max_sequence_length(MODEL_REPOSITORY / GENERATE.name / "1" / "pipeline")
    for width, height in [(64, 64), (96, 64)]:
        ref = pipe(
            PROMPT,
            width=width,
            height=height,
            num_inference_steps=4,
            guidance_scale=3.5,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="np",
            max_sequence_length=checkpoint_msl,
        ).images[0]
        ref = (ref * 255).round().astype(np.uint8)
        got = target_client.generate(
            GenerateParams(prompt=PROMPT, seed=7, width=width, height=height, steps=4, guidance=3.5)
        ).image
        assert got.shape == (height, width, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
        print(f"parity {width}x{height}: mean {diff.mean():.4f} max {diff.max()} (of 255)")
        assert diff.mean() <= 1.0 and diff.max() <= 8
        assert ref.std() > 5  # a non-trivial image, so the comparison means something


def test_seed_determinism(target_client) -> None:
    a = target_client.generate(GenerateParams(prompt=PROMPT, seed=1, **SMALL)).image
    b = target_client.generate(GenerateParams(prompt=PROMPT, seed=1, **SMALL)).image
    c = target_client.generate(GenerateParams(prompt=PROMPT, seed=2, **SMALL)).image
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1


def test_concurrent_requests_share_transformer_steps(target_triton, target_client) -> None:
    """4 concurrent generations: their per-step transformer calls are merged by the batcher."""
    triton, gen_client = target_triton, target_client
    before_inf = triton_metric(triton.metrics_url, "nv_inference_count", FLUX_TRANSFORMER)
    before_exec = triton_metric(triton.metrics_url, "nv_inference_exec_count", FLUX_TRANSFORMER)
    steps = 6

    def one(seed: int) -> np.ndarray:
        return gen_client.generate(GenerateParams(prompt=PROMPT, seed=seed, width=64, height=64, steps=steps)).image

    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(one, range(4)))
    assert len(images) == 4
    inferences = triton_metric(triton.metrics_url, "nv_inference_count", FLUX_TRANSFORMER) - before_inf
    executions = triton_metric(triton.metrics_url, "nv_inference_exec_count", FLUX_TRANSFORMER) - before_exec
    assert inferences == 4 * steps
    assert executions < inferences, f"no step batching: {executions} executions for {inferences} inferences"


def test_bad_input_rejected_by_server(target_triton) -> None:
    import tritonclient.grpc as g

    raw = g.InferenceServerClient(target_triton.grpc_url)
    prompt = g.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a fox"], dtype=np.object_))
    width = g.InferInput("width", [1], "INT32")
    width.set_data_from_numpy(np.array([100], dtype=np.int32))
    with pytest.raises(Exception) as info:
        raw.infer(GENERATE.name, [prompt, width])
    assert "INVALID_ARGUMENT" in str(info.value.status()) and "multiple of 16" in info.value.message()


# ----------------------------------------------------------------------------- through the facade


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_generate_matches_triton(facade, gen_client) -> None:
    with facade.client(timeout_s=300) as http:
        body = http.post("/generate", json={"prompt": PROMPT, **SMALL, "seed": 5}).json()
    direct = gen_client.generate(GenerateParams(prompt=PROMPT, seed=5, **SMALL)).image
    assert np.array_equal(_decode(body["images"][0]), direct)  # PNG is lossless


def test_triton_failure_mid_request_then_recovers(triton) -> None:
    """The transformer disappears while a generation runs: 503 with a message; then it serves again.
    On the session's Triton, which gets its transformer back however the test ends."""
    server = triton
    facade = start_facade(server.grpc_url, {"FLUXSERVE_API_REQUIRED_MODELS": '["generate"]'}, ready_path="/readyz")
    import tritonclient.http as th

    control = th.InferenceServerClient(server.http_url)
    try:
        result: dict = {}

        def slow_request() -> None:
            with facade.client(timeout_s=300) as http:
                result["r"] = http.post(
                    "/generate", json={"prompt": PROMPT, "width": 256, "height": 256, "steps": 100, "seed": 1}
                )

        def transformer_steps() -> int:
            stats = control.get_inference_statistics(FLUX_TRANSFORMER)["model_stats"]
            return sum(int(s.get("execution_count", 0)) for s in stats)

        t = threading.Thread(target=slow_request)
        t.start()
        deadline = time.monotonic() + 120
        while transformer_steps() < 1:  # the generation is in its denoising loop (100 steps to go)
            assert time.monotonic() < deadline and t.is_alive(), "the generation never reached the transformer"
            time.sleep(0.05)
        control.unload_model(FLUX_TRANSFORMER, headers=control_headers())
        t.join(300)
        r = result["r"]
        assert r.status_code in (503, 504), r.text
        assert r.json()["error"]["message"]
        control.load_model(FLUX_TRANSFORMER, headers=control_headers())
        with facade.client(timeout_s=300) as http:
            ok = http.post("/generate", json={"prompt": PROMPT, **SMALL, "seed": 1})
        assert ok.status_code == 200, ok.text
    finally:
        if not control.is_model_ready(FLUX_TRANSFORMER):
            control.load_model(FLUX_TRANSFORMER, headers=control_headers())
        control.close()
        facade.stop()
