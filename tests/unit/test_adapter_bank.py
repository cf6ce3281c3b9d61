"""Adapters as data in one transformer graph (issue 27, export.flux.adapter_bank), on the tiny FLUX.

What is proven here:
- a batch of slot 0 (other slots loaded) is the plain export: ONNX vs ONNX and vs PyTorch ~1e-5;
- a LoRA file (diffusers/PEFT layout, and a Kohya one with alpha != rank) in slot k gives
  PyTorch's transformer with that LoRA fused (diffusers' fuse_lora, or its deltas added), and a
  batch mixing adapters, scales and slot 0 gives every row its own adapter's output;
- the per-layer and grouped bank layouts compute the same thing;
- rank above R, a layer outside the branch set, text-encoder weights and bad slots are refused
  with the limit in the message;
- the bank is bound once, as OrtValues over the numpy arrays' own memory;
- int8: the branch MatMuls stay fp32 beside the int8 base MatMuls, slot 0 is the plain int8
  graph and an adapter moves the int8 output as it moves the fp32 one;
- weight patching: the default LoRA patched into the branch graph stays fused under slot 0, and
  an adapter adds on top of it (fp32 and int8);
- adapters published into the store run by name through the transformer model's slots exactly
  as loaded straight from their files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.adapter_bank import BANK_FILE, SCALE_INPUT, AdapterBank, AdapterRefused, BankLayout  # noqa: E402
from common.adapter_store import adapters_dir  # noqa: E402
from common.ort_session import make_session  # noqa: E402
from contract.specs import FLUX_ADAPTER_INPUT, FLUX_TRANSFORMER  # noqa: E402
from export.flux.adapter_bank import (  # noqa: E402
    AdapterFluxTransformer,
    adapter_from_deltas,
    branch_layers,
    export_adapter_transformer,
    quantize_adapter_export,
    read_adapter,
)
from export.flux.lora import build_local_lora, load_pipeline  # noqa: E402
from export.flux.lora_deltas import LayerDelta, layer_deltas, load_lora_state  # noqa: E402
from export.flux.onnx_export import BatchMajorFluxTransformer, export_all, transformer_inputs  # noqa: E402
from export.flux.transformer_precision import INT8_DIR, PRECISION_FILE, quantize_export  # noqa: E402
from export.flux.weight_patch import patch_export  # noqa: E402
from publish.adapters import publish_adapter  # noqa: E402
from serving.adapter_runner import AdapterRunner  # noqa: E402
from serving.adapter_session import AdapterSession  # noqa: E402

pytestmark = pytest.mark.slow

RANK = 8
"""The bank's R here: the local LoRA (rank 4) is padded, a rank-8 one fills it, rank 9 is refused."""
MAX_ONNX_VS_ONNX = 1e-5
MAX_ONNX_VS_TORCH = 5e-5
"""fp32 reordering between ONNX Runtime and PyTorch (~7e-6 measured); an adapter moves the output
by ~0.1 (asserted), so a row on the wrong adapter, scale or layout cannot pass."""
MIN_ADAPTER_EFFECT = 1e-2


@pytest.fixture(scope="module")
def base_pipeline(tiny_checkpoint: Path):
    return load_pipeline(tiny_checkpoint, None)


@pytest.fixture(scope="module")
def exports(base_pipeline, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The plain transformer export and the branch graph (grouped bank), from the same weights."""
    out = tmp_path_factory.mktemp("adapter-exports")
    export_all(base_pipeline, out, only=[FLUX_TRANSFORMER])
    result = export_adapter_transformer(base_pipeline.transformer, out, rank=RANK, layout="grouped")
    assert result.max_abs_error <= MAX_ONNX_VS_TORCH and result.slot0_error <= MAX_ONNX_VS_TORCH, result
    return {"plain": out / FLUX_TRANSFORMER, "adapters": result.path.parent}


@pytest.fixture(scope="module")
def feeds(base_pipeline) -> dict[str, np.ndarray]:
    return transformer_inputs(base_pipeline.transformer, 4, 8, 6, 10, seed=3)


@pytest.fixture(scope="module")
def second_lora(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-R LoRA (fills the bank, no padding) with other weights than the local one."""
    return build_local_lora(tiny_checkpoint, tmp_path_factory.mktemp("lora-b"), rank=RANK, seed=1)


def torch_out(transformer: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return BatchMajorFluxTransformer(transformer)(*(torch.from_numpy(v) for v in feeds.values())).numpy()


def fused_with(transformer: torch.nn.Module, lora: Path, scale: float) -> torch.nn.Module:
    """A copy of `transformer` with the LoRA's deltas added to its weights (weight_patch's fusion)."""
    fused = copy.deepcopy(transformer)
    modules = dict(fused.named_modules())
    state, alphas, metadata = load_lora_state(lora, None)
    with torch.no_grad():
        for path, delta in layer_deltas(state, alphas, metadata, "transformer.", scale).items():
            modules[path].weight += delta.weight_delta()
    return fused


def run_plain(model_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return make_session(model_dir / "model.onnx").run(None, feeds)[0]


def kohya_lora(base_pipeline, out: Path, names: dict[str, str], rank: int = 4) -> Path:
    """A Kohya/sd-scripts FLUX LoRA (`lora_unet_...lora_down.weight`, fused q/k/v, `.alpha` = 2x
    rank), the layout community LoRAs ship in, over the named modules ("qkv": (3 dim, dim) ...).
    No `single_blocks_N_linear1`: diffusers converts it with FLUX.1-dev's sizes written in."""
    cfg = base_pipeline.transformer.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = base_pipeline.transformer.single_transformer_blocks[0].proj_mlp.out_features
    shapes = {"qkv": (3 * dim, dim), "proj": (dim, dim), "linear2": (dim, dim + mlp)}
    shapes |= {"mlp0": (mlp, dim), "te": (base_pipeline.text_encoder.config.hidden_size,) * 2}
    g = torch.Generator().manual_seed(7)
    state: dict[str, torch.Tensor] = {}
    for module, kind in names.items():
        o, i = shapes[kind]
        state[f"{module}.lora_down.weight"] = torch.randn(rank, i, generator=g) / i**0.5
        state[f"{module}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.3
        state[f"{module}.alpha"] = torch.tensor(2.0 * rank)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "kohya.safetensors")
    return out / "kohya.safetensors"


KOHYA_IN_BRANCH_SET = {
    "lora_unet_double_blocks_0_img_attn_qkv": "qkv",
    "lora_unet_double_blocks_0_img_attn_proj": "proj",
    "lora_unet_double_blocks_0_txt_attn_qkv": "qkv",
    "lora_unet_single_blocks_0_linear2": "linear2",
}


# ----------------------------------------------------------------------------- numerics


def test_slot0_batch_is_the_plain_graph(exports, feeds, base_pipeline, tiny_lora: Path, second_lora: Path) -> None:
    sess = AdapterSession(exports["adapters"] / "model.onnx", slots=4)
    sess.load(1, read_adapter(tiny_lora, sess.layout))
    sess.load(2, read_adapter(second_lora, sess.layout))
    got = sess.run(feeds, [0, 0, 0, 1], [1.0, 2.0, 0.5, 0.0])  # scale 0 on slot 1: no adapter either
    plain_onnx, plain_torch = run_plain(exports["plain"], feeds), torch_out(base_pipeline.transformer, feeds)
    assert np.abs(got - plain_onnx).max() <= MAX_ONNX_VS_ONNX
    assert np.abs(got - plain_torch).max() <= MAX_ONNX_VS_TORCH
    moved = sess.run(feeds, [0, 0, 0, 1], [1.0, 2.0, 0.5, 1.0])
    assert np.abs(moved[3] - plain_onnx[3]).max() > MIN_ADAPTER_EFFECT  # the slot does act


def test_adapters_equal_their_fused_loras_row_by_row(
    exports, feeds, base_pipeline, fused_pipeline, tiny_lora: Path, second_lora: Path
) -> None:
    sess = AdapterSession(exports["adapters"] / "model.onnx", slots=5)
    a = read_adapter(tiny_lora, sess.layout)
    b = read_adapter(second_lora, sess.layout)
    assert (a.rank, b.rank) == (4, RANK)
    sess.load(3, a)
    sess.load(1, b)
    got = sess.run(feeds, [3, 1, 0, 3], [1.0, 0.5, 1.0, 0.25])
    refs = [
        torch_out(fused_pipeline.transformer, feeds),  # diffusers load_lora_weights + fuse_lora
        torch_out(fused_with(base_pipeline.transformer, second_lora, 0.5), feeds),
        torch_out(base_pipeline.transformer, feeds),
        torch_out(fused_with(base_pipeline.transformer, tiny_lora, 0.25), feeds),
    ]
    for row, ref in enumerate(refs):
        assert np.abs(got[row] - ref[row]).max() <= MAX_ONNX_VS_TORCH, row
    for row in (0, 1, 3):
        assert np.abs(refs[row][row] - refs[2][row]).max() > MIN_ADAPTER_EFFECT, row
    # the same adapters in other rows and slots: nothing leaks between rows
    sess.load(2, a)
    again = sess.run(feeds, [1, 2, 2, 0], [0.5, 1.0, 0.25, 1.0])
    assert np.abs(again[0] - refs[1][0]).max() <= MAX_ONNX_VS_TORCH
    assert np.abs(again[1] - refs[0][1]).max() <= MAX_ONNX_VS_TORCH
    assert np.abs(again[2] - refs[3][2]).max() <= MAX_ONNX_VS_TORCH
    assert np.abs(again[3] - refs[2][3]).max() <= MAX_ONNX_VS_TORCH


def test_kohya_lora_with_alpha_equals_diffusers_fused(
    exports, feeds, tiny_checkpoint: Path, base_pipeline, tmp_path: Path
) -> None:
    lora = kohya_lora(base_pipeline, tmp_path / "kohya", KOHYA_IN_BRANCH_SET)
    sess = AdapterSession(exports["adapters"] / "model.onnx", slots=2)
    sess.load(1, read_adapter(lora, sess.layout))
    got = sess.run(feeds, [1, 0, 1, 0], [1.0] * 4)
    fused = torch_out(load_pipeline(tiny_checkpoint, lora).transformer, feeds)
    plain = torch_out(base_pipeline.transformer, feeds)
    assert np.abs(got[[0, 2]] - fused[[0, 2]]).max() <= MAX_ONNX_VS_TORCH
    assert np.abs(got[[1, 3]] - plain[[1, 3]]).max() <= MAX_ONNX_VS_TORCH
    assert np.abs(fused - plain).max() > MIN_ADAPTER_EFFECT


def test_per_layer_and_grouped_layouts_agree(base_pipeline, feeds, tiny_lora: Path) -> None:
    """In PyTorch (what each export traces): the same adapters through either bank layout."""
    linears = branch_layers(base_pipeline.transformer)
    outs = []
    for layout in ("per_layer", "grouped"):
        bank_layout = BankLayout.build(linears, RANK, layout)
        bank = AdapterBank(bank_layout, slots=3)
        bank.put(2, read_adapter(tiny_lora, bank_layout))
        with AdapterFluxTransformer(base_pipeline.transformer, bank_layout) as module, torch.no_grad():
            outs.append(
                module(
                    *(torch.from_numpy(v) for v in feeds.values()),
                    torch.tensor([2, 0, 2, 1]),
                    torch.tensor([1.0, 1.0, 0.5, 1.0]),
                    [torch.from_numpy(bank.arrays[n]) for n in bank_layout.bank_inputs()],
                ).numpy()
            )
    assert np.abs(outs[0] - outs[1]).max() <= 1e-6
    plain = torch_out(base_pipeline.transformer, feeds)  # the hooks are gone after the context
    assert np.abs(outs[0][[1, 3]] - plain[[1, 3]]).max() <= 1e-6
    assert np.abs(outs[0][0] - plain[0]).max() > MIN_ADAPTER_EFFECT


# ----------------------------------------------------------------------------- refusals and binding


def test_refusals_name_the_limit(exports, tiny_checkpoint: Path, base_pipeline, tmp_path: Path) -> None:
    layout = BankLayout.load(exports["adapters"])
    too_high = build_local_lora(tiny_checkpoint, tmp_path / "rank9", rank=RANK + 1, seed=2)
    with pytest.raises(AdapterRefused, match=f"rank {RANK + 1} exceeds the adapter bank's max rank {RANK}"):
        read_adapter(too_high, layout)
    mlp = kohya_lora(
        base_pipeline, tmp_path / "mlp", {**KOHYA_IN_BRANCH_SET, "lora_unet_double_blocks_0_img_mlp_0": "mlp0"}
    )
    with pytest.raises(AdapterRefused, match=r"outside the adapter branch set \(13 layers.*ff\.net\.0\.proj"):
        read_adapter(mlp, layout)
    te = kohya_lora(base_pipeline, tmp_path / "te", {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "te"})
    with pytest.raises(AdapterRefused, match="holds transformer layers only"):
        read_adapter(te, layout)
    path = layout.layers[0]
    group, _ = layout.locate(path)
    bad = {path: LayerDelta(torch.zeros(2, group.in_features + 1), torch.zeros(group.out_features, 2), 1.0)}
    with pytest.raises(AdapterRefused, match="do not fit the layer"):
        adapter_from_deltas(bad, layout)

    sess = AdapterSession(exports["adapters"] / "model.onnx", slots=3)
    adapter = read_adapter(build_local_lora(tiny_checkpoint, tmp_path / "ok", rank=2, seed=3), layout)
    with pytest.raises(ValueError, match=r"slots 1\.\.2 \(0 is no adapter\)"):
        sess.load(0, adapter)
    with pytest.raises(ValueError, match=r"slots 1\.\.2"):
        sess.load(3, adapter)
    step = transformer_inputs(base_pipeline.transformer, 2, 4, 4, 4, seed=0)
    with pytest.raises(ValueError, match=r"slots must be in 0\.\.2, got \[0, 3\]"):
        sess.run(step, [0, 3], [1.0, 1.0])
    with pytest.raises(ValueError, match="one slot and one scale per row"):
        sess.run(step, [0], [1.0, 1.0])


def test_bank_is_bound_once_over_its_own_memory(exports, feeds, tiny_lora: Path) -> None:
    sess = AdapterSession(exports["adapters"] / "model.onnx", slots=3)
    pointers = {n: v.data_ptr() for n, v in sess.bank_values.items()}
    assert set(pointers) == set(sess.layout.bank_inputs())
    assert all(pointers[n] == sess.bank.arrays[n].ctypes.data for n in pointers)  # no copy
    sess.load(1, read_adapter(tiny_lora, sess.layout))
    assert {n: v.data_ptr() for n, v in sess.bank_values.items()} == pointers  # same memory, rewritten
    first = sess.run(feeds, [1, 0, 1, 0], [1.0] * 4)
    assert np.array_equal(first, sess.run(feeds, [1, 0, 1, 0], [1.0] * 4))
    sess.unload(1)
    plain = run_plain(exports["plain"], feeds)
    assert np.abs(first[0] - plain[0]).max() > MIN_ADAPTER_EFFECT
    assert np.abs(sess.run(feeds, [1, 0, 1, 0], [1.0] * 4) - plain).max() <= MAX_ONNX_VS_ONNX


# ----------------------------------------------------------------------------- int8 and weight patching


def _ops(model_path: Path) -> tuple[dict[str, int], int]:
    """(op counts, fp32 MatMuls whose B is not a weight) of a graph."""
    model = onnx.load(str(model_path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    dynamic = sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights)
    return counts, dynamic


def test_int8_branch_stays_fp32_and_acts(exports, feeds, tiny_lora: Path, tmp_path: Path) -> None:
    plain_int8 = quantize_export(exports["plain"], tmp_path / "plain-int8")
    adapters = Path(shutil.copytree(exports["adapters"], tmp_path / "adapters"))
    adapters_int8 = quantize_adapter_export(adapters)
    layout = BankLayout.load(adapters)
    (plain_ops, plain_dynamic), (ops, dynamic) = _ops(plain_int8), _ops(adapters_int8)
    assert ops["MatMulInteger"] == plain_ops["MatMulInteger"] > 0  # every base weight int8, as before
    assert ops.get("MatMul", 0) == plain_ops.get("MatMul", 0) + 2 * len(layout.layers)  # the branch: fp32
    assert dynamic == plain_dynamic + 2 * len(layout.layers)
    for fused in ("SimplifiedLayerNormalization", "FastGelu", "LayerNormalization"):  # the fusions still apply
        assert ops.get(fused) == plain_ops.get(fused), fused

    int8 = AdapterSession(adapters_int8, slots=2)
    fp32 = AdapterSession(adapters / "model.onnx", slots=2)
    for sess in (int8, fp32):
        sess.load(1, read_adapter(tiny_lora, sess.layout))
    # Slot 0 everywhere is the plain int8 graph. (Only everywhere: int8 quantizes activations with
    # one scale per tensor, the whole batch, so in int8 a row's neighbours move it slightly, with
    # or without adapters; fp32 rows are independent, as the tests above show.)
    got8 = int8.run(feeds, [0] * 4, [1.0] * 4)
    assert np.abs(got8 - run_plain(plain_int8.parent, feeds)).max() <= MAX_ONNX_VS_ONNX
    # With an adapter, the int8 row is as far from the fp32 row as int8 is anyway (the fp32 branch
    # adds no error of its own), and far closer to it than to the row without the adapter.
    same = {k: np.repeat(v[:1], 2, axis=0) for k, v in feeds.items()}
    (i8_adapter, i8_none), (f32_adapter, f32_none) = (sess.run(same, [1, 0], [1.0, 1.0]) for sess in (int8, fp32))
    int8_error = np.linalg.norm(i8_none - f32_none)
    adapter_error = np.linalg.norm(i8_adapter - f32_adapter)
    effect = np.linalg.norm(f32_adapter - f32_none)
    print(f"int8 vs fp32: {adapter_error:.4f} with the adapter, {int8_error:.4f} without; adapter effect {effect:.4f}")
    assert adapter_error <= 1.5 * int8_error
    assert effect > 4 * adapter_error


def test_weight_patching_keeps_the_default_lora_fused(
    exports, feeds, fused_pipeline, tiny_lora: Path, second_lora: Path, tmp_path: Path
) -> None:
    state, alphas, metadata = load_lora_state(tiny_lora, None)
    default = layer_deltas(state, alphas, metadata, "transformer.", 1.0)
    patched = tmp_path / "patched"
    patch_export(exports["adapters"], patched, default)
    assert (patched / BANK_FILE).exists()
    sess = AdapterSession(patched / "model.onnx", slots=2)
    sess.load(1, read_adapter(second_lora, sess.layout))
    got = sess.run(feeds, [0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0])
    default_ref = torch_out(fused_pipeline.transformer, feeds)
    both_ref = torch_out(fused_with(fused_pipeline.transformer, second_lora, 1.0), feeds)
    assert np.abs(got[[0, 2]] - default_ref[[0, 2]]).max() <= MAX_ONNX_VS_TORCH
    assert np.abs(got[[1, 3]] - both_ref[[1, 3]]).max() <= MAX_ONNX_VS_TORCH

    # int8 served: the patch requantizes the base weights; the branch is untouched and still fp32
    int8_base = Path(shutil.copytree(exports["adapters"], tmp_path / "int8-base"))
    quantize_adapter_export(int8_base)
    (int8_base / PRECISION_FILE).write_text(json.dumps({"served": "int8"}))
    patch_export(int8_base, tmp_path / "int8-patched", default)
    sess8 = AdapterSession(tmp_path / "int8-patched" / INT8_DIR / "model.onnx", slots=2)
    sess8.load(1, read_adapter(second_lora, sess8.layout))
    got8 = sess8.run(feeds, [0, 1, 0, 1], [1.0] * 4)
    for rows, ref in (([0, 2], default_ref), ([1, 3], both_ref)):
        rel = float(np.linalg.norm(got8[rows] - ref[rows]) / np.linalg.norm(ref[rows]))
        print(f"int8 patched + adapter rows {rows} vs PyTorch fp32: {rel:.4f} relative")
        assert rel < 0.05, (rows, rel)


# ----------------------------------------------------------------------------- the store, by name


def test_adapters_published_to_the_store_run_by_name(
    exports, feeds, tiny_lora: Path, second_lora: Path, tmp_path: Path
):
    """publish_adapter -> the store -> serving.adapter_runner's slots: the rows equal the session
    loaded straight from the LoRA files (the store's factors are the bank's, bit for bit)."""
    repo = tmp_path / "model_repository"
    version = Path(shutil.copytree(exports["adapters"], repo / FLUX_TRANSFORMER / "1"))
    publish_adapter(tiny_lora, "first", repository=repo)
    publish_adapter(second_lora, "second", repository=repo, scale=0.5)
    runner = AdapterRunner(AdapterSession(version / "model.onnx", slots=3), adapters_dir(repo))
    names = np.array([[b"first"], [b""], [b"second"], [b"first"]], dtype=np.object_)
    scales = np.array([1.0, 0.0, 0.5, 0.25], np.float32)
    (got,) = runner.run(None, feeds | {FLUX_ADAPTER_INPUT: names, SCALE_INPUT: scales})
    direct = AdapterSession(version / "model.onnx", slots=3)
    direct.load(1, read_adapter(tiny_lora, direct.layout))
    direct.load(2, read_adapter(second_lora, direct.layout))
    assert np.array_equal(got, direct.run(feeds, [1, 0, 2, 1], scales))
    assert np.abs(got[0] - got[1]).max() > MIN_ADAPTER_EFFECT
