"""The gpu-torch target on CPU: configs, version folders, loading, LoRA in place, fp8, compile, batching.

Everything here is the code that runs on the GPU, run with device=cpu on the tiny local FLUX:
- configs render and parse with Triton's schema, batching like the CPU target's components;
- a published version links the checkpoint's files, the pipelines hold the transformer LoRA's
  factors, and the loaded transformer patched to them equals diffusers' LoRA-fused one exactly (fp32);
- a LoRA the factors cannot express falls back to a saved fused module, with the same output;
- the LoRA is added in place (same storage) and can be taken out again;
- fp8 Linear layers stay close to the compute dtype; compiled equals eager;
- Triton's merged batch through BatchedOnnxRunner is one forward pass with per-request results;
- the FLUX.1-dev-sized builder has FLUX.1-dev's parameter counts, and random init is seeded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.torch_runtime import (  # noqa: E402
    LORA_FILE,
    MODULE_DIR,
    RUNTIME_PARAMETER,
    TorchRuntime,
    load_lora_factors,
    save_lora_factors,
)
from contract.specs import (  # noqa: E402
    FLUX_COMPONENTS,
    FLUX_PIPELINE_SLOTS,
    FLUX_TEXT_ENCODER,
    FLUX_TEXT_ENCODER_2,
    FLUX_TRANSFORMER,
    FLUX_VAE_DECODER,
    FUSED_LORA_FILE,
    GENERATE,
    GENERATE_STREAM,
)
from export.deployments import flux_deployments  # noqa: E402
from export.flux.full_size import DEV_PARAMETERS, build_random_flux, meta_modules  # noqa: E402
from export.flux.lora_deltas import NotPatchable, load_lora_state  # noqa: E402
from export.flux.onnx_export import transformer_inputs  # noqa: E402
from export.flux.settings import FluxSettings  # noqa: E402
from export.torch_target import TorchTargetSettings, torch_flux_deployments  # noqa: E402
from export.triton_config import config_text, parse_config  # noqa: E402
from publish.flux import deployed_target, publish_flux  # noqa: E402
from serving.onnx_runner import BatchedOnnxRunner  # noqa: E402
from serving.torch_components import (  # noqa: E402
    Fp8Linear,
    TorchComponent,
    fp8_layers,
    load_module,
    quantize_fp8,
)
from serving.torch_lora import add_lora  # noqa: E402

pytestmark = pytest.mark.slow

CPU32 = TorchRuntime(device="cpu", dtype="float32")


def transformer_forward(module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        out = module(
            hidden_states=t["hidden_states"],
            encoder_hidden_states=t["encoder_hidden_states"],
            pooled_projections=t["pooled_projections"],
            timestep=t["timestep"],
            img_ids=t["img_ids"][0],
            txt_ids=t["txt_ids"][0],
            guidance=t["guidance"],
            return_dict=False,
        )[0]
    return out.float().numpy()


@pytest.fixture(scope="module")
def torch_repo(tmp_path_factory, tiny_checkpoint: Path, tiny_lora: Path) -> Path:
    repo = tmp_path_factory.mktemp("torch-repo")
    env = {"FLUXSERVE_TORCH_DEVICE": "cpu", "FLUXSERVE_TORCH_DTYPE": "float32"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        publish_flux(
            repo,
            checkpoint=tiny_checkpoint,
            lora=tiny_lora,
            target="gpu-torch",
            settings=FluxSettings(build_dir=repo.parent / f"{repo.name}-build"),
        )
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return repo


# ----------------------------------------------------------------------------- configs


def test_runtime_parameters_round_trip_and_refuse_bad_values() -> None:
    rt = TorchRuntime(device="cuda:1", dtype="float16", compile_mode="reduce-overhead", fp8=True, fuse_qkv=True)
    assert TorchRuntime.from_parameters(rt.parameters()) == rt
    assert TorchRuntime.from_parameters({}) == TorchRuntime()
    for bad in ({"torch_dtype": "int8"}, {"torch_compile_mode": "fast"}, {"torch_device": "tpu"}, {"torch_fp8": "yes"}):
        with pytest.raises(ValueError):
            TorchRuntime.from_parameters(bad)


def test_gpu_torch_configs_parse_and_batch_like_the_cpu_components() -> None:
    deps, cpu = (
        torch_flux_deployments(torch_settings=TorchTargetSettings(fp8=True, compile_mode="default")),
        (flux_deployments()),
    )
    for name in FLUX_COMPONENTS:
        cfg = parse_config(config_text(deps[name], "gpu-torch"))
        ref = parse_config(config_text(cpu[name], "cpu"))
        assert cfg.backend == "python" and cfg.parameters[RUNTIME_PARAMETER].string_value == "torch"
        assert cfg.input == ref.input and cfg.output == ref.output and cfg.dynamic_batching == ref.dynamic_batching
        runtime = TorchRuntime.from_parameters({k: v.string_value for k, v in cfg.parameters.items()})
        # fp8 and compile only where they are meant to act.
        assert runtime.fp8 == (name == FLUX_TRANSFORMER)
        assert (runtime.compile_mode != "off") == (name in (FLUX_TRANSFORMER, FLUX_VAE_DECODER))
    assert parse_config(config_text(deps[GENERATE.name], "gpu-torch")) == parse_config(
        config_text(cpu[GENERATE.name], "cpu")
    )


# ----------------------------------------------------------------------------- version folders


def test_published_versions_link_the_checkpoint_and_hold_only_lora_factors(torch_repo: Path, tiny_checkpoint) -> None:
    for name in FLUX_COMPONENTS:
        version = torch_repo / name / "1"
        slot_dir = tiny_checkpoint / FLUX_PIPELINE_SLOTS[name]
        for f in slot_dir.iterdir():
            assert (version / MODULE_DIR / f.name).stat().st_ino == f.stat().st_ino, f  # a hard link, no copy
        # The tiny LoRA adapts the transformer only, and its factors travel with the pipelines.
        assert not (version / LORA_FILE).exists()
        manifest = json.loads((version / "fluxserve_manifest.json").read_text())
        assert manifest["target"] == "gpu-torch"
    factors = [torch_repo / pipeline / "1" / FUSED_LORA_FILE for pipeline in (GENERATE.name, GENERATE_STREAM.name)]
    assert factors[0].stat().st_ino == factors[1].stat().st_ino  # one file: one LoRA to the transformer
    assert deployed_target(torch_repo) == "gpu-torch"


def test_loaded_components_equal_the_lora_fused_pipeline(torch_repo: Path, fused_pipeline) -> None:
    transformer = TorchComponent.load(FLUX_TRANSFORMER, torch_repo / FLUX_TRANSFORMER / "1", CPU32)
    assert transformer.lora is not None and transformer.lora.use(f"{GENERATE.name}/1")  # what generate/1 names
    feeds = transformer_inputs(fused_pipeline.transformer, 2, 8, 12, 10, seed=3)
    assert np.array_equal(transformer(feeds), transformer_forward(fused_pipeline.transformer, feeds))
    ids = np.random.default_rng(0).integers(3, 200, (2, 77), dtype=np.int64)
    ids[:, 30] = fused_pipeline.text_encoder.config.eos_token_id
    clip = TorchComponent.load(FLUX_TEXT_ENCODER, torch_repo / FLUX_TEXT_ENCODER / "1", CPU32)
    with torch.no_grad():
        ref = fused_pipeline.text_encoder(torch.from_numpy(ids)).pooler_output.numpy()
    assert np.array_equal(clip({"input_ids": ids}), ref)
    t5 = TorchComponent.load(FLUX_TEXT_ENCODER_2, torch_repo / FLUX_TEXT_ENCODER_2 / "1", CPU32)
    assert t5({"input_ids": ids[:, :12]}).shape == (2, 12, fused_pipeline.text_encoder_2.config.d_model)
    vae = TorchComponent.load(FLUX_VAE_DECODER, torch_repo / FLUX_VAE_DECODER / "1", CPU32)
    latent = np.random.default_rng(1).standard_normal((1, 16, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = fused_pipeline.vae.decode(torch.from_numpy(latent), return_dict=False)[0].numpy()
    assert np.array_equal(vae({"latent": latent}), ref)


def test_a_lora_the_factors_cannot_express_is_saved_fused(
    tmp_path: Path, tiny_checkpoint, tiny_lora, fused_pipeline, monkeypatch
) -> None:
    import export.flux.torch_export as torch_export

    def refuse(*_args, **_kwargs):
        raise NotPatchable("a bias term")

    monkeypatch.setattr(torch_export, "lora_factors", refuse)
    monkeypatch.setenv("FLUXSERVE_TORCH_DEVICE", "cpu")
    result = publish_flux(
        tmp_path / "repo",
        checkpoint=tiny_checkpoint,
        lora=tiny_lora,
        target="gpu-torch",
        settings=FluxSettings(build_dir=tmp_path / "build"),
    )
    assert result["report"][FLUX_TRANSFORMER]["method"] == "fused"
    version = tmp_path / "repo" / FLUX_TRANSFORMER / "1"
    assert not (version / LORA_FILE).exists()
    loaded = TorchComponent.load(FLUX_TRANSFORMER, version, CPU32)
    feeds = transformer_inputs(fused_pipeline.transformer, 2, 8, 8, 10, seed=4)
    np.testing.assert_allclose(loaded(feeds), transformer_forward(fused_pipeline.transformer, feeds), atol=1e-5)


def test_lora_factors_refuse_layers_the_module_lacks(tiny_checkpoint, tiny_lora) -> None:
    from export.flux.torch_export import lora_factors, meta_module

    state, alphas, metadata = load_lora_state(tiny_lora, None)
    structure = meta_module("transformer", tiny_checkpoint / "transformer")
    assert len(lora_factors(state, alphas, metadata, "transformer", 1.0, structure)) == len(state) // 2
    renamed = {k.replace("transformer_blocks.0.", "transformer_blocks.7."): v for k, v in state.items()}
    with pytest.raises(NotPatchable, match="no Linear layer"):
        lora_factors(renamed, alphas, metadata, "transformer", 1.0, structure)
    first = next(k for k in state if k.endswith("lora_A.weight"))
    bad = dict(state) | {first: state[first][:, :-1]}  # one input feature short
    with pytest.raises(NotPatchable, match="does not fit"):
        lora_factors(bad, alphas, metadata, "transformer", 1.0, structure)


# ----------------------------------------------------------------------------- in place


def test_lora_is_added_in_place_and_taken_out_again(tiny_checkpoint: Path, torch_repo: Path) -> None:
    module = load_module("transformer", tiny_checkpoint / "transformer", torch.device("cpu"), torch.float32)
    factors = load_lora_factors(torch_repo / GENERATE.name / "1" / FUSED_LORA_FILE)
    layer = next(iter(factors))
    weight = module.get_submodule(layer).weight
    before, pointer = weight.clone(), weight.data_ptr()
    assert add_lora(module, factors) == len(factors)
    assert weight.data_ptr() == pointer and not torch.equal(weight, before)  # the same storage, changed
    add_lora(module, factors, sign=-1.0)
    torch.testing.assert_close(weight, before, atol=1e-6, rtol=0)
    unknown = dict(factors) | {"transformer_blocks.9.attn.to_q": factors[layer]}
    with pytest.raises(ValueError, match="no layer"):
        add_lora(module, unknown)
    torch.testing.assert_close(weight, before, atol=1e-6, rtol=0)  # nothing applied when one layer is wrong


def test_lora_factor_file_round_trips(tmp_path: Path) -> None:
    factors = {"a.b": (torch.randn(2, 5), torch.randn(3, 2), 0.75)}
    save_lora_factors(tmp_path / LORA_FILE, factors)
    ((down, up, scale),) = load_lora_factors(tmp_path / LORA_FILE).values()
    assert torch.equal(down, factors["a.b"][0]) and torch.equal(up, factors["a.b"][1]) and scale == 0.75


# ----------------------------------------------------------------------------- fp8, compile, batching


def test_fp8_linear_is_close_to_the_compute_dtype() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96).to(torch.bfloat16)
    x = torch.randn(4, 32, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ref, got = linear(x).float(), Fp8Linear(linear)(x).float()
    assert got.shape == ref.shape
    assert float((got - ref).norm() / ref.norm()) < 0.05  # e4m3: 3 mantissa bits, scaled per row


def test_fp8_transformer_swaps_the_block_linears_and_stays_close(tiny_checkpoint: Path, tiny_lora) -> None:
    bf16 = load_module("transformer", tiny_checkpoint / "transformer", torch.device("cpu"), torch.bfloat16)
    names = fp8_layers(bf16)
    assert names and not any(".norm" in n for n in names)  # modulation stays in bf16
    feeds = transformer_inputs(bf16, 2, 8, 8, 10, seed=5)
    ref = TorchComponent("flux_transformer", bf16, TorchRuntime(device="cpu"))(feeds)
    fp8 = load_module("transformer", tiny_checkpoint / "transformer", torch.device("cpu"), torch.bfloat16)
    assert quantize_fp8(fp8) == len(names)
    got = TorchComponent("flux_transformer", fp8, TorchRuntime(device="cpu", fp8=True))(feeds)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1


def test_compiled_transformer_equals_eager(torch_repo: Path) -> None:
    version = torch_repo / FLUX_TRANSFORMER / "1"
    eager = TorchComponent.load(FLUX_TRANSFORMER, version, CPU32)
    compiled = TorchComponent.load(
        FLUX_TRANSFORMER, version, TorchRuntime(device="cpu", dtype="float32", compile_mode="default", fuse_qkv=True)
    )
    names = [n for n, _ in compiled.module.named_modules()]
    assert any(n.endswith(".to_qkv") for n in names) and not any(n.endswith(".to_q") for n in names)
    feeds = transformer_inputs(eager.module, 1, 8, 8, 10, seed=6)
    base = compiled(feeds)
    np.testing.assert_allclose(base, eager(feeds), atol=2e-5)
    # The LoRA patched in place after compiling (into the fused q/k/v rows): the compiled code
    # reads the same tensors, so it runs the patched weights with no recompilation.
    for component in (eager, compiled):
        assert component.lora is not None and component.lora.use(f"{GENERATE.name}/1")
    patched = compiled(feeds)
    np.testing.assert_allclose(patched, eager(feeds), atol=2e-5)
    assert np.abs(patched - base).max() > 1e-3


def test_merged_batch_is_one_forward_with_per_request_results(torch_repo: Path) -> None:
    component = TorchComponent.load(FLUX_TRANSFORMER, torch_repo / FLUX_TRANSFORMER / "1", CPU32)
    calls: list[int] = []
    forward = component._forward
    component._forward = lambda f: calls.append(f["hidden_states"].shape[0]) or forward(f)  # type: ignore[method-assign]
    requests = [transformer_inputs(component.module, 1, 8, 8, 10, seed=s) for s in range(3)]
    requests = [
        r | {"timestep": r["timestep"].reshape(1, 1), "guidance": r["guidance"].reshape(1, 1)} for r in requests
    ]
    merged = BatchedOnnxRunner(component).run(requests)  # type: ignore[arg-type]
    assert calls == [3]
    for r, out in zip(requests, merged):
        alone = component({k: v.reshape(1) if k in ("timestep", "guidance") else v for k, v in r.items()})
        np.testing.assert_allclose(out["latent"], alone, atol=1e-5)


# ----------------------------------------------------------------------------- the FLUX.1-dev-sized build


def test_dev_sized_build_has_flux_dev_parameter_counts(tmp_path: Path) -> None:
    folder = build_random_flux(tmp_path / "dev", "dev")
    counts = {slot: sum(p.numel() for p in m.parameters()) for slot, m in meta_modules(folder).items()}
    assert counts == DEV_PARAMETERS
    assert not list(folder.rglob("*.safetensors"))  # no weights on disk


def test_random_init_is_seeded_and_servable(tmp_path: Path) -> None:
    folder = build_random_flux(tmp_path / "tiny", "tiny", seed=3)
    a = load_module("transformer", folder / "transformer", torch.device("cpu"), torch.bfloat16)
    b = load_module("transformer", folder / "transformer", torch.device("cpu"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    other = load_module("vae", folder / "vae", torch.device("cpu"), torch.bfloat16)
    assert other.dtype == torch.bfloat16


GPU_MACHINE_LACKS = (
    "onnx",
    "onnxruntime",
    "onnxscript",
    "peft",
    "accelerate",
    "aiohttp",
    "redis",
    "huey",
    "matplotlib",
)
"""What the GPU path must run without: a lent GPU machine carries at most 64 MiB of wheels."""


def test_the_gpu_path_imports_nothing_a_gpu_machine_would_have_to_carry_needlessly() -> None:
    import subprocess
    import sys

    code = "\n".join(
        [
            "import sys, types",
            *(f"sys.modules[{m!r}] = None" for m in GPU_MACHINE_LACKS),
            "sys.modules['triton_python_backend_utils'] = types.ModuleType('triton_python_backend_utils')",
            "import benchmarks.gpu, publish.flux, export.flux.torch_export, export.flux.full_size",
            "import export.flux.lora_deltas, export.flux.image_bounds, export.torch_target, runtime.launcher",
            "import serving.triton_flux_component, serving.triton_torch, serving.triton_generate",
            "import serving.triton_generate_stream, serving.triton_flux_prepare",
        ]
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
