"""gpu-torch on a real Triton: a new LoRA is patched into the running transformer in place.

The other public behaviours run on both targets in test_generate.py and test_generate_stream.py
(`target_triton`). This module swaps a second LoRA into a running gpu-torch Triton of its own (the
shared one keeps serving the built LoRA for their parity test) while requests run, and checks what
a user and an operator see: a new `generate` version whose images equal diffusers' pipeline with
that LoRA fused, the transformer (and T5 and the VAE) with no new version and the same process (no
reload), and every image made whole by the LoRA of the version it reports. The in-place patch
itself (storage, rounding, locking) is tested in-process in tests/unit/test_torch_lora.py. And the
facade, unary and streamed, in front of the shared gpu-torch Triton.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from client.triton_client import TritonClient
from common.flux_assets import read_max_sequence_length
from contract.specs import (
    FLUX_TEXT_ENCODER_2,
    FLUX_TRANSFORMER,
    FLUX_VAE_DECODER,
    FUSED_LORA_FILE,
    GENERATE,
    GenerateParams,
)
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


def stub_processes(repo: Path, model: str) -> set[tuple[int, str]]:
    """(pid, start time) of the python-backend stubs serving `model` from `repo`: a model that
    Triton reloads gets new ones."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            started = (proc / "stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            continue
        if "triton_python_backend_stub" in cmdline and f"{repo / model}/" in cmdline:
            found.add((int(proc.name), started))
    return found


def same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding (a LoRA switched out and back in is not bit-identical)."""
    if a.shape != b.shape:
        return False
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return bool(diff.max() <= 2 and diff.mean() <= 0.05)


class Traffic:
    """Generations in two threads until stopped: every image with the version that made it."""

    def __init__(self, url: str, params: GenerateParams) -> None:
        self.url, self.params = url, params
        self.images: list[tuple[str, np.ndarray]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.new_seen = threading.Condition()
        self.threads = [threading.Thread(target=self._loop) for _ in range(2)]

    def _loop(self) -> None:
        with TritonClient(self.url, timeout_s=300) as client:
            while not self.stop.is_set():
                try:
                    got = client.generate(self.params)
                except Exception as e:  # recorded: the swap must not fail a request
                    self.errors.append(f"{type(e).__name__}: {e}")
                    continue
                with self.new_seen:
                    self.images.append((got.model_version, got.image))
                    self.new_seen.notify_all()

    def count(self, version: str) -> int:
        return sum(v == version for v, _ in self.images)


def test_a_new_lora_is_patched_into_the_running_transformer(
    swap_repo: Path, swap_triton, tmp_path: Path, monkeypatch
) -> None:
    """A second LoRA while requests run: no transformer version or reload, the new images equal
    diffusers' pipeline with that LoRA fused, and every image is whole on the LoRA of the version
    that reports it (the transformer switches per call, so old and new requests interleave)."""
    from publish.flux import publish_and_swap

    prov = served_provenance()
    checkpoint = Path(prov["checkpoint"])
    params = GenerateParams(prompt=PROMPT, seed=3, width=64, height=64, steps=3)
    with TritonClient(swap_triton.grpc_url, timeout_s=300) as client:
        before = client.generate(params)
    stubs = stub_processes(swap_repo, FLUX_TRANSFORMER)
    assert stubs, "no python-backend stub of flux_transformer found"
    lora = build_local_lora(checkpoint, tmp_path / "lora-b", seed=11, trigger_word="zxq")
    for key, value in TORCH_ENV.items():
        monkeypatch.setenv(key, value)
    traffic = Traffic(swap_triton.grpc_url, params)
    for t in traffic.threads:
        t.start()
    try:
        swapped = publish_and_swap(swap_repo, swap_triton.http_url, checkpoint=checkpoint, lora=lora, lora_scale=1.0)
        new = swapped["model_version"]
        with traffic.new_seen:  # both threads' requests reach the new version
            assert traffic.new_seen.wait_for(lambda: traffic.count(new) >= 4, timeout=300)
    finally:
        traffic.stop.set()
        for t in traffic.threads:
            t.join(timeout=300)
    with TritonClient(swap_triton.grpc_url, timeout_s=300) as client:
        after = client.generate(params)
    assert int(new) == int(before.model_version) + 1 == int(after.model_version)
    # Only the pipelines changed: the transformer kept its version and its process (no reload).
    assert FLUX_TRANSFORMER not in swapped["created"] and versions(swap_repo, FLUX_TRANSFORMER) == [1]
    assert {swapped["components"][n] for n in (FLUX_TRANSFORMER, FLUX_TEXT_ENCODER_2, FLUX_VAE_DECODER)} == {1}
    assert stub_processes(swap_repo, FLUX_TRANSFORMER) == stubs
    old_factors, new_factors = (swap_repo / GENERATE.name / v / FUSED_LORA_FILE for v in (before.model_version, new))
    assert old_factors.read_bytes() != new_factors.read_bytes()

    assert traffic.errors == []
    assert traffic.count(before.model_version) >= 1  # requests of the old version ran beside the swap
    for version, image in traffic.images:
        assert version in (before.model_version, new), version
        assert same_image(image, before.image if version == before.model_version else after.image), version

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
