"""gpu-torch on a real Triton: a new LoRA is hot-swapped in as factors over the same base files.

The other public behaviours run on both targets in test_generate.py and test_generate_stream.py
(`target_triton`). This module swaps a second LoRA into a running gpu-torch Triton of its own (the
shared one keeps serving the built LoRA for their parity test) and checks what a user and an
operator see: a new `generate` version, an image equal to diffusers' pipeline with that LoRA fused,
a transformer version that added only the LoRA's factors (its weights are the same files), and
T5 and the VAE untouched (no new version, no reload). And the facade, unary and streamed, in
front of the shared gpu-torch Triton.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.triton_client import TritonClient
from common.flux_assets import read_max_sequence_length
from common.torch_runtime import LORA_FILE, MODULE_DIR
from contract.specs import FLUX_TEXT_ENCODER_2, FLUX_TRANSFORMER, FLUX_VAE_DECODER, GENERATE, GenerateParams
from export.flux.lora import build_local_lora, load_pipeline
from publish.repository import versions
from tests.conftest import start_triton
from tests.integration.conftest import TORCH_ENV, publish_torch, served_provenance

pytestmark = pytest.mark.integration

PROMPT = "Super Realism, a lighthouse at night"


@pytest.fixture(scope="module")
def swap_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prov = served_provenance()
    repo = tmp_path_factory.mktemp("gpu-torch-swap")
    publish_torch(repo, checkpoint=prov["checkpoint"], lora=prov["lora"], lora_scale=prov["lora_scale"])
    return repo


@pytest.fixture(scope="module")
def swap_triton(swap_repo: Path):
    server = start_triton(swap_repo, log_name="test-triton-gpu-torch-swap.log")
    yield server
    server.stop()


def test_a_new_lora_is_swapped_in_as_factors(swap_repo: Path, swap_triton, tmp_path: Path, monkeypatch) -> None:
    from publish.flux import publish_and_swap

    prov = served_provenance()
    checkpoint = Path(prov["checkpoint"])
    with TritonClient(swap_triton.grpc_url, timeout_s=300) as client:
        before = client.generate(GenerateParams(prompt=PROMPT, seed=3, width=64, height=64, steps=3))
        lora = build_local_lora(checkpoint, tmp_path / "lora-b", seed=11, trigger_word="zxq")
        for key, value in TORCH_ENV.items():
            monkeypatch.setenv(key, value)
        swapped = publish_and_swap(swap_repo, swap_triton.http_url, checkpoint=checkpoint, lora=lora, lora_scale=1.0)
        after = client.generate(GenerateParams(prompt=PROMPT, seed=3, width=64, height=64, steps=3))
    assert int(swapped["model_version"]) == int(before.model_version) + 1 == int(after.model_version)
    # Only the transformer (and the pipelines that pin it) changed; T5 and the VAE stayed loaded as they were.
    assert swapped["components"][FLUX_TEXT_ENCODER_2] == 1 and swapped["components"][FLUX_VAE_DECODER] == 1
    old, new = (swap_repo / FLUX_TRANSFORMER / str(v) for v in versions(swap_repo, FLUX_TRANSFORMER)[-2:])
    for f in (old / MODULE_DIR).iterdir():
        assert (new / MODULE_DIR / f.name).stat().st_ino == f.stat().st_ino  # the same weight files
    assert (new / LORA_FILE).read_bytes() != (old / LORA_FILE).read_bytes()

    pipe = load_pipeline(checkpoint, lora, lora_scale=1.0)
    ref = pipe(
        PROMPT,
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
        max_sequence_length=read_max_sequence_length(swap_repo / GENERATE.name / "1" / "pipeline"),
    ).images[0]
    ref = (ref * 255).round().astype(np.int16)
    diff = np.abs(after.image.astype(np.int16) - ref)
    assert diff.mean() <= 1.0 and diff.max() <= 8, (diff.mean(), diff.max())
    assert np.abs(after.image.astype(np.int16) - before.image.astype(np.int16)).mean() > 1  # the LoRA changed it


def test_the_facade_serves_gpu_torch_as_it_serves_cpu(torch_triton) -> None:
    """/generate, unary and streamed, through the real facade in front of a gpu-torch Triton."""
    import base64
    import io

    from PIL import Image

    from tests.conftest import start_facade

    facade = start_facade(torch_triton.grpc_url, {"FLUXSERVE_API_REQUIRED_MODELS": '["generate"]'}, "/readyz")
    body = {"prompt": "a red fox in snow", "width": 64, "height": 64, "steps": 2, "seed": 5}
    try:
        with facade.client(timeout_s=300) as http:
            unary = http.post("/generate", json=body)
            with http.stream("POST", "/generate", json=body, headers={"accept": "text/event-stream"}) as r:
                events = [line[6:].strip() for line in r.iter_lines() if line.startswith("event:")]
    finally:
        facade.stop()
    assert unary.status_code == 200, unary.text
    image = Image.open(io.BytesIO(base64.b64decode(unary.json()["images"][0])))
    assert image.size == (64, 64) and unary.json()["prompt"].startswith("Super Realism")
    assert events == ["progress", "progress", "image"], events
