"""ONNX export of the FLUX components: contract names/dtypes, dynamic axes, parity with PyTorch."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from contract.specs import (
    FLUX_COMPONENTS,
    FLUX_IO_NAMES,
    FLUX_TEXT_ENCODER,
    FLUX_TEXT_ENCODER_2,
    FLUX_TRANSFORMER,
    FLUX_VAE_DECODER,
)  # noqa: E402
from export.flux import onnx_export  # noqa: E402
from export.flux.onnx_export import BatchMajorFluxTransformer, export_all, onnx_path, transformer_inputs  # noqa: E402

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

MAX_EXPORT_ERROR = 1e-3
"""fp32 reorderings give ~1e-5 on the tiny model; a wrong graph gives O(0.1) or more."""
ORT_DTYPE = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}


@pytest.fixture(scope="session")
def exported(fused_pipeline, tiny_checkpoint: Path) -> dict[str, onnx_export.ExportResult]:
    events: list[tuple[str, bool]] = []
    results = export_all(
        fused_pipeline,
        tiny_checkpoint.parent / "flux-tiny-0-onnx",
        progress=lambda name, res: events.append((name, res is not None)),
    )
    assert events == [(n, done) for n in FLUX_IO_NAMES for done in (False, True)]
    return results


def test_every_component_matches_pytorch_on_unseen_shapes(exported: dict[str, onnx_export.ExportResult]) -> None:
    assert set(exported) == set(FLUX_IO_NAMES)
    for name, res in exported.items():
        log.info("%s: max |ORT - torch| = %.3g on %s", name, res.max_abs_error, res.check_shapes)
        assert res.path.exists()
        # The components a LoRA changes keep one file per weight (patched in later); the others embed them.
        assert res.external_data == (name in (FLUX_TRANSFORMER, FLUX_TEXT_ENCODER)), name
        assert res.max_abs_error < MAX_EXPORT_ERROR, (name, res.max_abs_error)
        # The check used batch 3; the sample batch 2. A check on the sample would prove nothing.
        assert next(iter(res.check_shapes.values()))[0] == 3


def test_graph_io_follows_the_contract(exported: dict[str, onnx_export.ExportResult]) -> None:
    for name, res in exported.items():
        sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
        spec = FLUX_COMPONENTS[name]
        assert [i.name for i in sess.get_inputs()] == [t.name for t in spec.inputs]
        assert [o.name for o in sess.get_outputs()] == [t.name for t in spec.outputs]
        for node, t in zip([*sess.get_inputs(), *sess.get_outputs()], [*spec.inputs, *spec.outputs]):
            assert ORT_DTYPE[node.type] == t.dtype, (name, t.name)
            assert isinstance(node.shape[0], str), f"{name}.{t.name}: batch axis is not dynamic ({node.shape})"


@pytest.mark.parametrize("batch,latent_hw,text_len", [(1, (4, 4), 64), (5, (6, 4), 7)])
def test_transformer_runs_at_batch_one_and_other_shapes(
    exported, fused_pipeline, batch: int, latent_hw: tuple[int, int], text_len: int
) -> None:
    """Triton sends batch 1 whenever a step finds no partner; the export saw batch 2."""
    feeds = transformer_inputs(fused_pipeline.transformer, batch, *latent_hw, text_len, seed=batch)
    sess = ort.InferenceSession(
        str(onnx_path(exported[FLUX_TRANSFORMER].path.parent.parent, FLUX_TRANSFORMER)),
        providers=["CPUExecutionProvider"],
    )
    (got,) = sess.run(None, feeds)
    with torch.no_grad():
        ref = BatchMajorFluxTransformer(fused_pipeline.transformer)(
            *(torch.from_numpy(v) for v in feeds.values())
        ).numpy()
    assert got.shape == feeds["hidden_states"].shape
    assert np.abs(got - ref).max() < MAX_EXPORT_ERROR


def test_vae_decoder_upsamples_8x(exported) -> None:
    sess = ort.InferenceSession(str(exported[FLUX_VAE_DECODER].path), providers=["CPUExecutionProvider"])
    (images,) = sess.run(None, {"latent": np.zeros((1, 16, 8, 12), np.float32)})
    assert images.shape == (1, 3, 64, 96)


def test_large_models_use_external_data(fused_pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLUX.1-dev's transformer is > 2 GB: its weights must go to a side file, and still load."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    res = onnx_export.export_text_encoder_2(fused_pipeline.text_encoder_2, tmp_path)
    data = res.path.with_name(res.path.name + ".data")
    assert res.external_data and data.exists()
    param_bytes = sum(p.numel() * 4 for p in fused_pipeline.text_encoder_2.parameters())
    assert data.stat().st_size >= 0.9 * param_bytes, "weights were embedded in the protobuf"
    assert res.max_abs_error < MAX_EXPORT_ERROR
    assert res.name == FLUX_TEXT_ENCODER_2
