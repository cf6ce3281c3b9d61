"""The running gpu-torch transformer takes a new LoRA in place (serving/torch_lora.py), on CPU.

- publishing a second LoRA writes no transformer version: the pipelines' new versions carry the
  factors, and `generate` and `generate_stream` of one version share one file;
- switching the loaded transformer from one LoRA to another gives what a fresh load of the second
  gives, with the same tensors (storage unchanged) and no second load;
- the patch math: remove and add in one rounding, the fused q/k/v rows, fp8 rows requantized,
  nothing changed by a LoRA that does not fit, a patch failing part-way undone;
- an execution holds the switch from its patch to its last forward: one running while another
  patches sees the old or the new weights, never a mix; a batch mixing two LoRAs switches once;
- the request parameter names only a pipeline version's own LoRA file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import serving.torch_lora as torch_lora  # noqa: E402
from common.torch_runtime import LORA_FILE, TorchRuntime, load_lora_factors  # noqa: E402
from contract.specs import (  # noqa: E402
    FLUX_TRANSFORMER,
    FUSED_LORA_FILE,
    GENERATE,
    GENERATE_STREAM,
    fused_lora_source,
)
from export.flux.lora import build_local_lora, load_pipeline  # noqa: E402
from export.flux.onnx_export import transformer_inputs  # noqa: E402
from export.flux.settings import FluxSettings  # noqa: E402
from publish.flux import publish_flux  # noqa: E402
from publish.repository import versions  # noqa: E402
from serving.torch_components import TorchComponent, fuse_qkv, load_module, quantize_fp8  # noqa: E402
from serving.torch_lora import BASE, PatchError, patch_lora, run_without_lora  # noqa: E402

pytestmark = pytest.mark.slow

CPU32 = TorchRuntime(device="cpu", dtype="float32")
A, B = f"{GENERATE.name}/1", f"{GENERATE.name}/2"


@pytest.fixture(scope="module")
def lora_b(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_local_lora(tiny_checkpoint, tmp_path_factory.mktemp("lora-b"), seed=11, trigger_word="zxq")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_checkpoint: Path, tiny_lora: Path, lora_b: Path) -> Path:
    """A gpu-torch repository where generate/1 runs `tiny_lora` and generate/2 `lora_b`."""
    repo = tmp_path_factory.mktemp("torch-lora-repo")
    env = {"FLUXSERVE_TORCH_DEVICE": "cpu", "FLUXSERVE_TORCH_DTYPE": "float32"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for lora in (tiny_lora, lora_b):
            publish_flux(
                repo,
                checkpoint=tiny_checkpoint,
                lora=lora,
                target="gpu-torch",
                settings=FluxSettings(build_dir=repo.parent / f"{repo.name}-build"),
            )
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return repo


def transformer(repo: Path, runtime: TorchRuntime = CPU32) -> TorchComponent:
    return TorchComponent.load(FLUX_TRANSFORMER, repo / FLUX_TRANSFORMER / "1", runtime)


@pytest.fixture(scope="module")
def feeds(repo: Path) -> dict[str, np.ndarray]:
    return transformer_inputs(transformer(repo).module, 2, 8, 8, 10, seed=3)


@pytest.fixture(scope="module")
def fresh(repo: Path, feeds) -> dict[str, np.ndarray]:
    """The transformer's output on a fresh load, per LoRA (BASE: none)."""
    out = {}
    for source in (None, A, B):
        component = transformer(repo)
        assert component.lora is not None
        component.lora.use(source)
        out[source or BASE] = component(feeds)
    return out


def factors(repo: Path, source: str):
    parsed = fused_lora_source(source)
    assert parsed is not None
    return load_lora_factors(repo / parsed[0] / str(parsed[1]) / FUSED_LORA_FILE)


# ----------------------------------------------------------------------------- publishing


def test_a_new_lora_publishes_pipelines_and_no_transformer_version(repo: Path) -> None:
    assert versions(repo, FLUX_TRANSFORMER) == [1]  # the second LoRA wrote no transformer
    assert versions(repo, GENERATE.name) == versions(repo, GENERATE_STREAM.name) == [1, 2]
    assert not (repo / FLUX_TRANSFORMER / "1" / LORA_FILE).exists()
    first, second = (repo / GENERATE.name / v / FUSED_LORA_FILE for v in ("1", "2"))
    assert first.read_bytes() != second.read_bytes()
    assert (repo / GENERATE_STREAM.name / "2" / FUSED_LORA_FILE).stat().st_ino == second.stat().st_ino


def test_fresh_loads_match_diffusers_fused_pipeline(repo: Path, tiny_checkpoint, lora_b, fresh, feeds) -> None:
    pipe = load_pipeline(tiny_checkpoint, lora_b)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        ref = pipe.transformer(
            **{k: t[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")},
            img_ids=t["img_ids"][0],
            txt_ids=t["txt_ids"][0],
            guidance=t["guidance"],
            return_dict=False,
        )[0].numpy()
    np.testing.assert_allclose(fresh[B], ref, atol=1e-5)
    assert np.abs(fresh[A] - fresh[B]).max() > 1e-2  # the two LoRAs differ: the checks below can fail


# ----------------------------------------------------------------------------- in place


def test_switching_in_place_equals_a_fresh_load_and_reloads_nothing(repo: Path, feeds, fresh, monkeypatch) -> None:
    import serving.torch_components as components

    loads: list[Path] = []
    real_load = components.load_module
    monkeypatch.setattr(components, "load_module", lambda *a, **k: loads.append(a[1]) or real_load(*a, **k))
    component = transformer(repo)
    switch = component.lora
    assert switch is not None
    storage = {name: (p.data_ptr(), p) for name, p in component.module.named_parameters()}
    for source in (A, B, A, None, B):  # every switch, back and forth, and to the base and away from it
        switch.use(source)
        np.testing.assert_allclose(component(feeds), fresh[source or BASE], atol=2e-5, err_msg=str(source))
    assert switch.use(B) is False  # already applied: nothing to do
    assert switch.patches == 5 and len(loads) == 1  # five switches, one load
    for name, p in component.module.named_parameters():
        assert storage[name][1] is p and p.data_ptr() == storage[name][0], name  # the same tensors, same storage


def test_remove_and_add_round_once_and_a_bad_lora_changes_nothing(repo: Path, tiny_checkpoint: Path) -> None:
    a, b = factors(repo, A), factors(repo, B)
    module = load_module("transformer", tiny_checkpoint / "transformer", torch.device("cpu"), torch.bfloat16)
    base = {n: p.clone() for n, p in module.named_parameters()}
    layer = next(iter(a))
    weight = module.get_submodule(layer).weight
    patch_lora(module, add=a)
    with_a = weight.detach().clone()
    patch_lora(module, remove=a, add=b)
    down, up, scale = b[layer]
    old_down, old_up, old_scale = a[layer]
    # One rounding per switch: the old LoRA's and the new one's deltas summed in float32 first.
    once = (with_a.float() + ((old_up @ old_down) * -old_scale + (up @ down) * scale)).to(torch.bfloat16)
    assert torch.equal(weight, once)
    expected = base[f"{layer}.weight"].float() + (up @ down) * scale  # exact, in float32
    # So the drift from base + B after two switches is at most two half-ulps of bfloat16 (8
    # significant bits) at the largest value involved.
    largest = torch.maximum(torch.maximum(with_a.float().abs(), weight.float().abs()), expected.abs())
    ulp = 2.0 ** (torch.floor(torch.log2(largest.clamp(min=1e-30))) - 7)
    error = (weight.float() - expected).abs()
    assert bool((error <= ulp).all()), float((error / ulp).max())
    before = {n: p.clone() for n, p in module.named_parameters()}
    for bad in (
        a | {"transformer_blocks.9.attn.to_q": a[layer]},  # no such layer
        a | {layer: (down[:, :-1], up, scale)},  # one input feature short
    ):
        with pytest.raises(ValueError):
            patch_lora(module, remove=b, add=bad)
        assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


def test_fused_qkv_rows_and_fp8_rows_take_the_patch(repo: Path, tiny_checkpoint: Path) -> None:
    a = factors(repo, A)
    assert any(k.endswith(".to_k") for k in a)  # the LoRA adapts projections that fusing merges

    def built(fuse: bool, patch_first: bool) -> torch.nn.Module:
        m = load_module("transformer", tiny_checkpoint / "transformer", torch.device("cpu"), torch.float32)
        if patch_first:
            patch_lora(m, add=a)
        if fuse:
            fuse_qkv(m)
        if not patch_first:
            patch_lora(m, add=a)
        return m

    feeds = transformer_inputs(built(False, True), 1, 8, 8, 10, seed=4)
    ref = TorchComponent(FLUX_TRANSFORMER, built(False, True), CPU32)(feeds)
    np.testing.assert_allclose(TorchComponent(FLUX_TRANSFORMER, built(True, False), CPU32)(feeds), ref, atol=2e-5)

    # fp8: quantized, then patched (rows dequantized, patched, requantized) vs patched, then quantized.
    def bf16(patch: bool) -> torch.nn.Module:
        m = load_module("transformer", tiny_checkpoint / "transformer", torch.device("cpu"), torch.bfloat16)
        if patch:
            patch_lora(m, add=a)
        return m

    early, late, plain = bf16(True), bf16(False), bf16(False)
    quantize_fp8(early)
    quantize_fp8(late)
    patch_lora(late, add=a)
    fp8 = TorchRuntime(device="cpu", fp8=True)
    got, want = (TorchComponent(FLUX_TRANSFORMER, m, fp8)(feeds) for m in (late, early))
    lora_effect = np.linalg.norm(want - TorchComponent(FLUX_TRANSFORMER, plain, TorchRuntime(device="cpu"))(feeds))
    assert np.linalg.norm(got - want) < 0.25 * lora_effect  # an fp8 rounding apart, far less than the LoRA


def test_a_patch_failing_part_way_is_undone(repo: Path, feeds, fresh, monkeypatch) -> None:
    component = transformer(repo)
    switch = component.lora
    assert switch is not None
    switch.use(A)
    real_apply, calls = torch_lora._apply, []

    def failing(layer, parts):
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        real_apply(layer, parts)

    monkeypatch.setattr(torch_lora, "_apply", failing)
    with pytest.raises(PatchError, match="undone"):
        switch.use(B)
    monkeypatch.setattr(torch_lora, "_apply", real_apply)
    assert switch.applied == switch.identify(A)
    np.testing.assert_allclose(component(feeds), fresh[A], atol=2e-5)  # A again, whole
    switch.use(B)
    np.testing.assert_allclose(component(feeds), fresh[B], atol=2e-5)


# ----------------------------------------------------------------------------- executions


def batch_run(component: TorchComponent):
    """What BatchedOnnxRunner.run does for the served model, one forward per request."""
    return lambda group: [component(f) for f in group]


def test_an_execution_never_sees_half_a_patch(repo: Path, feeds, fresh, monkeypatch) -> None:
    """An execution on A starts while another switches the weights to B and is stopped halfway
    through its layers: it must wait for the lock and then run on A whole (without the lock it
    finishes on half-patched weights, and this test fails)."""
    component = transformer(repo)
    switch = component.lora
    assert switch is not None
    switch.use(A)
    halfway, other_done = threading.Event(), threading.Event()
    real_apply, applied = torch_lora._apply, []

    def slow_apply(layer, parts):
        real_apply(layer, parts)
        applied.append(layer)
        if len(applied) == 5:  # part of the layers are B's, the rest still A's
            halfway.set()
            other_done.wait(timeout=2.0)  # the other execution would finish here if it did not wait

    monkeypatch.setattr(torch_lora, "_apply", slow_apply)
    results: dict[str, list] = {}

    def execute(name: str, source: str) -> None:
        results[name] = switch.run(batch_run(component), [feeds], [source])
        if name == "reader":
            other_done.set()

    patcher = threading.Thread(target=execute, args=("patcher", B))
    patcher.start()
    assert halfway.wait(timeout=60)
    reader = threading.Thread(target=execute, args=("reader", A))
    reader.start()
    patcher.join(timeout=120)
    reader.join(timeout=120)
    assert not patcher.is_alive() and not reader.is_alive()
    np.testing.assert_allclose(results["patcher"][0], fresh[B], atol=2e-5)
    np.testing.assert_allclose(results["reader"][0], fresh[A], atol=2e-5)


def test_a_mixed_batch_switches_once_and_answers_each_request_with_its_lora(repo: Path, feeds, fresh) -> None:
    component = transformer(repo)
    switch = component.lora
    assert switch is not None
    switch.use(A)
    before = switch.patches
    out = switch.run(batch_run(component), [feeds] * 4, [B, A, B, GENERATE_STREAM.name + "/1"])
    assert switch.patches == before + 1  # A's group first (applied), then one switch to B
    for got, source in zip(out, (B, A, B, A)):
        np.testing.assert_allclose(got, fresh[source], atol=2e-5)


@pytest.mark.parametrize(
    "source",
    ["../../etc/passwd", "generate/0", "generate/01", "classify/1", "flux_transformer/1", "generate/1/../2", 5, "/x/1"],
)
def test_a_request_naming_anything_but_a_pipeline_version_is_refused(repo: Path, feeds, fresh, source) -> None:
    component = transformer(repo)
    assert component.lora is not None
    out = component.lora.run(batch_run(component), [feeds, feeds], [source, A])
    assert isinstance(out[0], ValueError) and "fused_lora" in str(out[0])
    np.testing.assert_allclose(out[1], fresh[A], atol=2e-5)  # the rest of the execution runs


def test_a_version_without_a_lora_file_and_a_component_without_loras_refuse(repo: Path, feeds) -> None:
    component = transformer(repo)
    assert component.lora is not None
    (missing,) = component.lora.run(batch_run(component), [feeds], [f"{GENERATE.name}/99"])
    assert isinstance(missing, ValueError) and "holds no transformer LoRA" in str(missing)
    named, plain = run_without_lora(lambda group: ["ok"] * len(group), [{}, {}], [A, None], "flux_vae_decoder")
    assert isinstance(named, ValueError) and "takes no fused_lora" in str(named) and plain == "ok"
