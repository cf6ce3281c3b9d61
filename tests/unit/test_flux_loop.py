"""FluxLoop (numpy around component callables) reproduces diffusers' FluxPipeline.

The key check: the loop on the exported ONNX models, with the LoRA fused, gives the image the
PyTorch FluxPipeline gives for the same prompt and seed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.specs import GenerateParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.flux_assets import copy_loop_assets  # noqa: E402
from contract.specs import FLUX_IO_NAMES, FLUX_TRANSFORMER  # noqa: E402
from export.flux.onnx_export import export_all, onnx_path  # noqa: E402
from serving.flux_loop import FluxLoop, ort_callables, torch_callables  # noqa: E402

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

PROMPT = "Super Realism, a red fox in snow"
MAX_MEAN_PIXEL_DIFF = 1.0
MAX_PIXEL_DIFF = 8


@pytest.fixture(scope="session")
def onnx_dir(fused_pipeline, tiny_checkpoint: Path) -> Path:
    out = tiny_checkpoint.parent / "flux-tiny-0-onnx"
    if not all(onnx_path(out, name).exists() for name in FLUX_IO_NAMES):  # test_flux_onnx may have made them
        export_all(fused_pipeline, out)
    return out


@pytest.fixture(scope="session")
def ort_loop(tiny_checkpoint: Path, onnx_dir: Path) -> FluxLoop:
    return FluxLoop(tiny_checkpoint, *ort_callables(onnx_dir))


def reference(pipe, req: GenerateParams, max_sequence_length: int) -> np.ndarray:
    images = pipe(
        req.prompt,
        width=req.width,
        height=req.height,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance,
        max_sequence_length=max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(req.seed),
        output_type="np",
    ).images
    return (images[0] * 255).round().astype(np.uint8)


@pytest.mark.parametrize("width,height", [(64, 64), (64, 96)])
def test_onnx_loop_matches_flux_pipeline(fused_pipeline, ort_loop: FluxLoop, width: int, height: int) -> None:
    req = GenerateParams(prompt=PROMPT, width=width, height=height, steps=4, guidance=3.5, seed=42)
    ref = reference(fused_pipeline, req, ort_loop.max_sequence_length)
    got = ort_loop(req)
    assert got.dtype == np.uint8 and got.shape == ref.shape == (height, width, 3)
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    log.info("%dx%d: mean |pixel diff| = %.4f, max = %d (of 255)", width, height, diff.mean(), diff.max())
    assert ref.std() > 5, "the reference image is flat: the comparison would prove little"
    assert diff.mean() <= MAX_MEAN_PIXEL_DIFF and diff.max() <= MAX_PIXEL_DIFF


def test_torch_loop_is_bit_exact(fused_pipeline, tiny_checkpoint: Path) -> None:
    """With the pipeline's own modules as components the loop must add no error at all."""
    loop = FluxLoop(tiny_checkpoint, *torch_callables(fused_pipeline))
    req = GenerateParams(prompt=PROMPT, width=96, height=64, steps=3, guidance=2.0, seed=7)
    assert np.array_equal(loop(req), reference(fused_pipeline, req, loop.max_sequence_length))


def test_seed_decides_the_image(ort_loop: FluxLoop) -> None:
    req = GenerateParams(prompt=PROMPT, width=64, height=64, steps=2, guidance=3.5, seed=42)
    first, again = ort_loop(req), ort_loop(req)
    other = ort_loop(GenerateParams(prompt=PROMPT, width=64, height=64, steps=2, guidance=3.5, seed=43))
    assert np.array_equal(first, again)
    assert np.abs(first.astype(np.int16) - other).mean() > 5


def test_loop_calls_components_batch_major_and_reports_steps(
    tiny_checkpoint: Path, onnx_dir: Path, tmp_path: Path
) -> None:
    """Runs from a weight-free copy of the checkpoint, as the Triton model does."""
    clip, t5, transformer, vae = ort_callables(onnx_dir)
    seen: list[dict[str, tuple[int, ...]]] = []

    def spy(*args: np.ndarray, **kwargs: np.ndarray) -> np.ndarray:
        assert not kwargs and len(args) == len(FLUX_IO_NAMES[FLUX_TRANSFORMER][0])
        seen.append({n: a.shape for n, a in zip(FLUX_IO_NAMES[FLUX_TRANSFORMER][0], args)})
        assert all(a.dtype == np.float32 for a in args)
        return transformer(*args)

    assets = copy_loop_assets(tiny_checkpoint, tmp_path / "pipeline")
    assert not list(assets.rglob("*.safetensors"))
    loop = FluxLoop(assets, clip, t5, spy, vae)
    steps: list[tuple[int, int]] = []
    image = loop(
        GenerateParams(prompt=PROMPT, width=96, height=64, steps=3, guidance=3.5, seed=1),
        on_step=lambda i, n: steps.append((i, n)),
    )
    assert image.shape == (64, 96, 3)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    n, length = (64 // 16) * (96 // 16), loop.max_sequence_length
    assert seen[0] == {
        "hidden_states": (1, n, 64),
        "encoder_hidden_states": (1, length, 32),
        "pooled_projections": (1, 32),
        "timestep": (1,),
        "img_ids": (1, n, 3),
        "txt_ids": (1, length, 3),
        "guidance": (1,),
    }


def test_timestep_input_is_sigma_scale(ort_loop: FluxLoop) -> None:
    """The transformer's `timestep` is the scheduler timestep / 1000 (what FluxPipeline passes)."""
    captured: list[float] = []
    inner = ort_loop.transformer

    def spy(*args: np.ndarray) -> np.ndarray:
        captured.append(float(args[FLUX_IO_NAMES[FLUX_TRANSFORMER][0].index("timestep")][0]))
        return inner(*args)

    loop = FluxLoop(ort_loop.checkpoint_dir, ort_loop.encode_clip, ort_loop.encode_t5, spy, ort_loop.decode_vae)
    loop(GenerateParams(prompt=PROMPT, width=64, height=64, steps=4, guidance=3.5, seed=0))
    assert captured[0] == pytest.approx(1.0) and all(0 < t <= 1 for t in captured)
    assert captured == sorted(captured, reverse=True)
