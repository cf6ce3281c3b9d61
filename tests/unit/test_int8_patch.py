"""The int8 transformer: chosen by measured images, and patched by requantizing changed tensors.

What is proven here, on the tiny local FLUX:
- patching a LoRA into the int8 graph (fp32 patch of the base, then ORT's quantizer on just the
  changed tensors) writes exactly the bytes that quantizing the whole fp32-patched graph writes,
  for MatMul layers and for Gemm layers (which the quantizer turns into MatMul over a transposed
  copy), and ONNX Runtime's outputs are identical;
- the patched int8 folder writes only the requantized tensors and hard-links the rest;
- the precision rule: int8 only when both image bounds hold and it is faster; a setting forces either.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from contract.specs import FLUX_TRANSFORMER  # noqa: E402
from export.flux.lora import load_pipeline, lora_target_modules  # noqa: E402
from export.flux.onnx_export import export_all, transformer_inputs  # noqa: E402
from export.flux.transformer_precision import (  # noqa: E402
    INT8_DIR,
    MAX_LATENT_RELATIVE_ERROR,
    MAX_MEAN_ABS_PIXEL,
    MIN_PSNR_DB,
    PRECISION_FILE,
    build_and_choose,
    choose,
    quantize_export,
    served_dir,
)
from export.flux.weight_map import WEIGHTS_DIR  # noqa: E402
from export.flux.weight_patch import LayerDelta, patch_export  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_pipeline(tiny_checkpoint: Path):
    return load_pipeline(tiny_checkpoint, None)


@pytest.fixture(scope="module")
def int8_base(base_pipeline, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformer export with its int8 graph, chosen by force (the tiny model's timings are noise)."""
    out = tmp_path_factory.mktemp("int8-base")
    export_all(base_pipeline, out, only=[FLUX_TRANSFORMER])
    choice = build_and_choose(out / FLUX_TRANSFORMER, "int8", tiny_checkpoint, base_pipeline)
    assert choice.served == "int8" and choice.mean_abs_pixel_diff is not None
    # the measured figures the choice rests on: close, and not identical (the graphs do differ)
    assert choice.latent_relative_error is not None
    assert all(0 < e <= MAX_LATENT_RELATIVE_ERROR for e in choice.latent_relative_error), choice
    print(
        f"int8 vs fp32: images {choice.mean_abs_pixel_diff} / {choice.psnr_db} dB, latents {choice.latent_relative_error}"
    )
    return out / FLUX_TRANSFORMER


def fp32_only_copy(export: Path, dst: Path) -> Path:
    """The same base export without the int8 graph: patch_export then writes the fp32 patch."""
    for f in export.rglob("*"):
        rel = f.relative_to(export)
        if f.is_file() and rel.parts[0] not in (INT8_DIR, PRECISION_FILE):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dst / rel)
    return dst


def deltas(base_pipeline, seed: int) -> dict[str, LayerDelta]:
    """LoRA deltas on attention (MatMul) and modulation (Gemm) layers of both block kinds."""
    g = torch.Generator().manual_seed(seed)
    linears = dict(base_pipeline.transformer.named_modules())
    paths = [p for p in lora_target_modules(base_pipeline.transformer) if p.endswith(("to_q", "to_out.0", "proj_out"))]
    paths += ["transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.norm.linear"]
    out = {}
    for p in paths:
        lin = linears[p]
        out[p] = LayerDelta(
            torch.randn(4, lin.in_features, generator=g) / lin.in_features**0.5,
            torch.randn(lin.out_features, 4, generator=g) * 0.3,
            2.0,
        )
    return out


def run(model: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_int8_patch_equals_quantizing_the_patched_fp32_graph(int8_base: Path, base_pipeline, tmp_path: Path) -> None:
    d = deltas(base_pipeline, seed=1)
    patched = tmp_path / "patched"
    report = patch_export(int8_base, patched, d)
    assert served_dir(patched) == patched / INT8_DIR
    # The reference: the fp32 patch of the same base, then the whole graph through quantize_dynamic.
    fp32_patched = tmp_path / "fp32-patched"
    patch_export(fp32_only_copy(int8_base, tmp_path / "fp32-base"), fp32_patched, d)
    ref = quantize_export(fp32_patched, tmp_path / "ref-int8")
    got_dir, ref_dir = patched / INT8_DIR, ref.parent
    names = sorted(f.name for f in (ref_dir / WEIGHTS_DIR).iterdir())
    assert names == sorted(f.name for f in (got_dir / WEIGHTS_DIR).iterdir())
    differing = [
        n for n in names if (got_dir / WEIGHTS_DIR / n).read_bytes() != (ref_dir / WEIGHTS_DIR / n).read_bytes()
    ]
    assert differing == []
    # The patch did change the served weights, Gemm-derived ones included.
    base_int8 = int8_base / INT8_DIR / WEIGHTS_DIR
    changed = [n for n in names if (got_dir / WEIGHTS_DIR / n).read_bytes() != (base_int8 / n).read_bytes()]
    assert any("norm1.linear.weight_Transposed_quantized" in n for n in changed)
    assert any("_scale" in n for n in changed) and len(changed) >= len(d)
    feeds = transformer_inputs(base_pipeline.transformer, 2, 8, 6, 10, seed=3)
    got, want = run(got_dir / "model.onnx", feeds), run(ref, feeds)
    assert np.array_equal(got, want)
    assert np.abs(got - run(int8_base / INT8_DIR / "model.onnx", feeds)).max() > 1e-3
    # Only the requantized tensors are new; everything else is a hard link into the base.
    new_bytes = sum(
        f.stat().st_size
        for f in patched.rglob("*")
        if f.is_file() and f.stat().st_ino != (int8_base / f.relative_to(patched)).stat().st_ino
    )
    assert new_bytes == report.changed_bytes
    assert report.changed_bytes < 0.5 * sum(f.stat().st_size for f in (got_dir / WEIGHTS_DIR).iterdir())
    assert not (patched / "model.onnx").exists(), "the unpatched fp32 graph must not sit in a patched export"


def test_int8_patches_start_from_the_base(int8_base: Path, base_pipeline, tmp_path: Path) -> None:
    a, b = deltas(base_pipeline, seed=2), deltas(base_pipeline, seed=3)
    patch_export(int8_base, tmp_path / "a", a)
    patch_export(int8_base, tmp_path / "b", b)
    fresh = tmp_path / "b-alone"
    shutil.copytree(int8_base, tmp_path / "base-copy", copy_function=os.link)
    patch_export(tmp_path / "base-copy", fresh, b)
    for f in (tmp_path / "b" / INT8_DIR / WEIGHTS_DIR).iterdir():
        assert f.read_bytes() == (fresh / INT8_DIR / WEIGHTS_DIR / f.name).read_bytes()


def test_precision_rule() -> None:
    close, psnr = [0.2, 0.3], [55.0, 54.0]
    assert choose("auto", close, psnr, 600.0, 300.0)[0] == "int8"
    assert choose("auto", [0.2, MAX_MEAN_ABS_PIXEL + 0.01], psnr, 600.0, 300.0)[0] == "fp32"
    assert choose("auto", close, [55.0, MIN_PSNR_DB - 0.1], 600.0, 300.0)[0] == "fp32"
    assert choose("auto", close, psnr, 300.0, 310.0)[0] == "fp32"  # not faster
    assert choose("auto", None, None, None, None)[0] == "fp32"
    assert choose("int8", [9.0], [10.0], 1.0, 2.0)[0] == "int8"
    assert choose("fp32", close, psnr, 600.0, 300.0)[0] == "fp32"
    # Images can hide a bad transformer behind the random VAE's grey: the latents cannot.
    assert choose("auto", close, psnr, 600.0, 300.0, [0.01, 0.02])[0] == "int8"
    served, reason = choose("auto", close, psnr, 600.0, 300.0, [0.01, MAX_LATENT_RELATIVE_ERROR + 0.01])
    assert served == "fp32" and "latents" in reason


@pytest.mark.parametrize("branch", [False, True], ids=["plain", "adapter-branch"])
def test_publish_path_patches_and_ships_the_int8_graph(
    tiny_checkpoint: Path, tiny_lora: Path, tmp_path: Path, branch: bool
) -> None:
    """export_onnx as publish_flux calls it with int8 forced: the base is exported once with its
    int8 graph, the LoRA is patched into it, and the files published are the int8 graph's (with
    the adapter branch: and its bank layout, recording the base model)."""
    from common.adapter_bank import BANK_FILE, BankLayout
    from export.flux.lora import lora_targets
    from export.flux.settings import FluxSettings
    from export.flux_build import (
        ADAPTER_BRANCH,
        TRANSFORMER_PRECISION,
        _component_files,
        adapter_branch,
        base_transformer_fingerprint,
        component_provenance,
        export_onnx,
        source_fingerprint,
    )

    s = FluxSettings(build_dir=tmp_path / "build")
    prov = {
        "checkpoint": str(tiny_checkpoint),
        "checkpoint_files": source_fingerprint(tiny_checkpoint),
        "lora": str(tiny_lora),
        "lora_files": source_fingerprint(tiny_lora),
        "lora_scale": 1.0,
        "trigger_word": "x",
        "onnx_opset": s.onnx_opset,
        TRANSFORMER_PRECISION: "int8",
    }
    if branch:
        prov[ADAPTER_BRANCH] = adapter_branch(FluxSettings(adapter_rank=8), "cpu", prov["checkpoint_files"])
    per = {FLUX_TRANSFORMER: component_provenance(prov, lora_targets(tiny_lora))[FLUX_TRANSFORMER]}
    base = {FLUX_TRANSFORMER: component_provenance(prov, frozenset())[FLUX_TRANSFORMER]}
    assert per[FLUX_TRANSFORMER][TRANSFORMER_PRECISION] == "int8"
    report = export_onnx(tiny_checkpoint, tiny_lora, 1.0, s.export_root, per, s, base_provenance=base)
    facts = report[FLUX_TRANSFORMER]
    assert facts["method"] == "patch" and facts["precision"]["served"] == "int8"
    files = _component_files(Path(facts["onnx_dir"]), FLUX_TRANSFORMER)
    patched = Path(facts["onnx_dir"]) / FLUX_TRANSFORMER / INT8_DIR
    assert files["model.onnx"] == patched / "model.onnx"
    assert all(p.is_relative_to(patched) for k, p in files.items() if k.startswith(WEIGHTS_DIR))
    assert PRECISION_FILE in files and "weight_map.json" not in files
    assert (BANK_FILE in files) is branch
    if branch:
        layout = BankLayout.load(files[BANK_FILE].parent)
        assert layout.rank == 8 and layout.base_fingerprint == base_transformer_fingerprint(tiny_checkpoint)
    # The base's fp32 graph is not the same export as an fp32-only one (fingerprints differ).
    fp32_only = component_provenance({**prov, TRANSFORMER_PRECISION: "fp32"}, frozenset())[FLUX_TRANSFORMER]
    assert fp32_only != base[FLUX_TRANSFORMER]


@pytest.mark.parametrize("op", ["MatMul", "Gemm-transB", "Gemm"])
def test_whole_array_requantize_is_orts_quantizer_bit_for_bit(op: str) -> None:
    """The whole-array per-channel arithmetic against ORT's own quantizer, on edge cases too: an
    all-zero column (degenerate scale), a column of denormals, exact .5 ties after scaling."""
    from onnx import TensorProto, helper

    from export.flux.int8_patch import _whole_array, requantize_with_ort

    rng = np.random.default_rng(7)
    w = rng.standard_normal((48, 40)).astype(np.float32)
    w[:, 0] = 0.0
    w[:, 1] = np.float32(1e-42)
    # absmax 63.5 -> scale exactly 0.5, and every other value lands on k + 0.5: round half to even.
    w[:, 2] = np.concatenate([[63.5, -63.5], (np.arange(-23, 23) + 0.5) * 0.5]).astype(np.float32)
    w[:, 3] = np.abs(w[:, 3])  # one-signed: the symmetric range still holds 0
    if op == "MatMul":
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    else:
        w = np.ascontiguousarray(w.T) if op == "Gemm-transB" else w  # Gemm(transB=1) stores (out, in)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=int(op == "Gemm-transB"))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[],
    )
    if op != "MatMul":
        graph.input.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, None))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    fast = _whole_array(model, {"w": w})
    assert fast is not None
    ours = {k: v for k, v in fast.items()}
    theirs = requantize_with_ort(model, {"w": w})
    assert ours == theirs
    assert len(ours) == 3


def test_auto_serves_fp32_when_int8_cannot_be_measured(int8_base: Path, tmp_path: Path) -> None:
    """auto never fails an export over int8: a build or measurement error keeps fp32 (with why)."""
    export = fp32_only_copy(int8_base, tmp_path / "export")
    choice = build_and_choose(export, "auto", tmp_path, pipeline=None)  # no pipeline: cannot measure
    assert choice.served == "fp32" and "failed" in choice.reason
    assert served_dir(export) == export and not (export / INT8_DIR).exists()
    with pytest.raises(Exception):
        build_and_choose(export, "int8", tmp_path, pipeline=None)  # forced: the error surfaces
