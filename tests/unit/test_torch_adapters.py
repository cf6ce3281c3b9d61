"""The adapter branch on the gpu-torch transformer (serving/torch_adapters.py), on CPU in float32.

What is proven here, on the tiny FLUX:
- the branch computes what the CPU graph's torch reference (export.flux.adapter_bank.
  AdapterFluxTransformer, what the ONNX export traces) computes, row by row, for both bank layouts;
- a mixed batch gives every row its own adapter (each row equal to PyTorch with that LoRA fused
  in at that scale); slot 0 rows, and batches without adapters, are the plain transformer bit for bit;
- fused q/k/v, torch.compile (no recompilation when the rows' adapters change) and fp8 layers
  carry the branch too;
- `fluxserve-export --target gpu-torch` with FLUXSERVE_FLUX_ADAPTER_BRANCH ships the CPU export's
  bank layout (so one adapter store serves both targets) and the adapter inputs in the config;
- the served model (serving/triton_torch.py, Triton's side faked): the pipeline's default LoRA
  patched into W in place and adapters from the store by name add up; the bank is written in place;
  a request naming an unknown adapter fails alone with INVALID_ARG; requests without the adapter
  inputs run slot 0.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.adapter_bank import BANK_FILE, SCALE_INPUT, AdapterBank, BankLayout, fit_factors  # noqa: E402
from common.torch_runtime import TorchRuntime  # noqa: E402
from contract.specs import (  # noqa: E402
    ADAPTER_SLOTS_PARAMETER,
    FLUX_ADAPTER_INPUT,
    FLUX_TRANSFORMER,
    FUSED_LORA_PARAMETER,
    GENERATE,
)
from export.flux.adapter_bank import AdapterFluxTransformer, branch_layers, read_adapter  # noqa: E402
from export.flux.lora import build_local_lora, load_pipeline  # noqa: E402
from export.flux.lora_deltas import layer_deltas, load_lora_state  # noqa: E402
from export.flux.onnx_export import transformer_inputs  # noqa: E402
from export.flux.settings import FluxSettings  # noqa: E402
from export.flux_build import ADAPTER_BRANCH, base_transformer_fingerprint  # noqa: E402
from export.triton_config import parse_config  # noqa: E402
from publish.adapters import publish_adapter  # noqa: E402
from publish.flux import publish_flux  # noqa: E402
from serving.torch_adapters import TorchAdapterSession, adapter_runner  # noqa: E402
from serving.torch_components import TorchComponent, compile_in_place, fuse_qkv, load_module, quantize_fp8  # noqa: E402

pytestmark = pytest.mark.slow

RANK = 8
"""The bank's R: the local LoRA (rank 4) is zero-padded, the second one (rank 8) fills it."""
CPU32 = TorchRuntime(device="cpu", dtype="float32")
MAX_VS_FUSED = 2e-5
"""fp32: a low-rank branch against the same delta added into W differ by reordering only (~1e-6);
an adapter moves a row by ~0.1 (asserted), so a row on the wrong adapter or scale cannot pass."""
MIN_ADAPTER_EFFECT = 1e-2
SLOTS, SCALES = [1, 0, 3, 1], [1.0, 1.0, 0.5, 0.25]
"""A mixed batch: the local LoRA, none, the second LoRA at 0.5, the local LoRA at 0.25."""


@pytest.fixture(scope="module")
def base_pipeline(tiny_checkpoint: Path):
    return load_pipeline(tiny_checkpoint, None)


@pytest.fixture(scope="module")
def second_lora(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_local_lora(tiny_checkpoint, tmp_path_factory.mktemp("lora-b"), rank=RANK, seed=1)


@pytest.fixture(scope="module")
def feeds(base_pipeline) -> dict[str, np.ndarray]:
    return transformer_inputs(base_pipeline.transformer, 4, 8, 6, 10, seed=3)


def component(checkpoint: Path, runtime: TorchRuntime = CPU32) -> TorchComponent:
    dtype = getattr(torch, runtime.dtype)
    return TorchComponent(
        FLUX_TRANSFORMER, load_module("transformer", checkpoint / "transformer", "cpu", dtype), runtime
    )


def session(comp: TorchComponent, tiny_lora: Path, second: Path, layout: str = "grouped") -> TorchAdapterSession:
    """The branch on `comp` with the local LoRA in slot 1 and the second one in slot 3."""
    bank_layout = BankLayout.build(branch_layers(comp.module), RANK, layout)  # type: ignore[arg-type]
    return loaded(TorchAdapterSession(comp, bank_layout, slots=4), tiny_lora, second)


def loaded(sess: TorchAdapterSession, tiny_lora: Path, second: Path) -> TorchAdapterSession:
    sess.load(1, read_adapter(tiny_lora, sess.layout))
    sess.load(3, read_adapter(second, sess.layout))
    return sess


def fused_with(transformer: torch.nn.Module, lora: Path, scale: float) -> torch.nn.Module:
    """A copy of `transformer` with the LoRA's deltas added to its weights."""
    fused = copy.deepcopy(transformer)
    modules = dict(fused.named_modules())
    state, alphas, metadata = load_lora_state(lora, None)
    with torch.no_grad():
        for path, delta in layer_deltas(state, alphas, metadata, "transformer.", scale).items():
            modules[path].weight += delta.weight_delta()
    return fused


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("layout", ["grouped", "per_layer"])
def test_branch_equals_the_cpu_graphs_torch_reference(tiny_checkpoint, tiny_lora, second_lora, feeds, layout) -> None:
    comp = component(tiny_checkpoint)
    sess = session(comp, tiny_lora, second_lora, layout)
    got = sess.run(feeds, SLOTS, SCALES)
    bank = AdapterBank(sess.layout, 4)  # the numpy bank the ONNX graph reads, filled the same way
    bank.put(1, read_adapter(tiny_lora, sess.layout))
    bank.put(3, read_adapter(second_lora, sess.layout))
    sess.remove()  # the reference hooks the same module: ours must be off
    with AdapterFluxTransformer(comp.module, sess.layout) as ref, torch.no_grad():
        want = ref(
            *(torch.from_numpy(v) for v in feeds.values()),
            torch.tensor(SLOTS),
            torch.tensor(SCALES),
            [torch.from_numpy(bank.arrays[n]) for n in sess.layout.bank_inputs()],
        ).numpy()
    assert np.abs(got - want).max() <= 1e-6


def test_rows_get_their_own_adapters_and_slot0_is_the_plain_transformer(
    tiny_checkpoint, tiny_lora, second_lora, feeds, base_pipeline, fused_pipeline
) -> None:
    comp = component(tiny_checkpoint)
    plain = comp(feeds)
    sess = session(comp, tiny_lora, second_lora)
    got = sess.run(feeds, SLOTS, SCALES)
    refs = [
        TorchComponent(FLUX_TRANSFORMER, fused_pipeline.transformer, CPU32)(feeds),  # diffusers' fuse_lora
        plain,
        TorchComponent(FLUX_TRANSFORMER, fused_with(base_pipeline.transformer, second_lora, 0.5), CPU32)(feeds),
        TorchComponent(FLUX_TRANSFORMER, fused_with(base_pipeline.transformer, tiny_lora, 0.25), CPU32)(feeds),
    ]
    for row, ref in enumerate(refs):
        assert np.abs(got[row] - ref[row]).max() <= MAX_VS_FUSED, row
    for row in (0, 2, 3):
        assert np.abs(got[row] - plain[row]).max() > MIN_ADAPTER_EFFECT, row
    assert np.array_equal(got[1], plain[1])  # a slot 0 row in a mixed batch adds exact zeros
    assert np.array_equal(sess.run(feeds, [0, 0, 0, 0], [1.0] * 4), plain)  # no branch run at all
    assert np.array_equal(sess.run(feeds, [1, 3, 1, 3], [0.0] * 4), plain)  # scale 0 is no adapter either
    # the same adapters in other rows and slots: nothing leaks between rows
    sess.load(2, read_adapter(tiny_lora, sess.layout))
    again = sess.run(feeds, [3, 2, 0, 1], [0.5, 1.0, 1.0, 0.25])
    for row, ref in zip(range(4), (refs[2], refs[0], plain, refs[3])):
        assert np.abs(again[row] - ref[row]).max() <= MAX_VS_FUSED, row
    assert comp(feeds).tobytes() == plain.tobytes()  # outside `run` the hooks add nothing


def test_fused_qkv_and_compiled_branch_agree_without_recompiling(
    tiny_checkpoint, tiny_lora, second_lora, feeds
) -> None:
    from torch._dynamo.utils import counters

    want = session(component(tiny_checkpoint), tiny_lora, second_lora).run(feeds, SLOTS, SCALES)
    runtime = TorchRuntime(device="cpu", dtype="float32", compile_mode="default", compile_backend="eager")
    comp = component(tiny_checkpoint, runtime)
    layout = BankLayout.build(branch_layers(comp.module), RANK, "grouped")  # type: ignore[arg-type]
    assert fuse_qkv(comp.module) > 0  # to_q/to_k/to_v are gone: their branches add to to_qkv's thirds
    compile_in_place(comp.module, runtime)
    sess = loaded(TorchAdapterSession(comp, layout, slots=4), tiny_lora, second_lora)
    torch._dynamo.reset()
    counters.clear()
    got = sess.run(feeds, SLOTS, SCALES)
    assert np.abs(got - want).max() <= 1e-5
    sess.run(feeds, [3, 3, 0, 1], [1.0, 2.0, 1.0, 0.5])
    sess.run(feeds, [0, 0, 0, 0], [0.0] * 4)
    sess.run(feeds, SLOTS, SCALES)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2  # with and without the branch; slots and scales are data


def test_fused_qkv_with_a_branch_on_some_thirds_only(tiny_checkpoint, feeds) -> None:
    """A bank with only `to_k` of one block and `to_v` of another: the fused layer's other thirds add nothing."""
    plain = component(tiny_checkpoint)
    paths = ["transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v"]
    layout = BankLayout.build(branch_layers(plain.module, paths), RANK, "grouped")  # type: ignore[arg-type]
    rng = np.random.default_rng(5)
    factors = {}
    for path in paths:
        group, _ = layout.locate(path)
        a = rng.standard_normal((group.in_features, RANK)).astype(np.float32) * 0.3
        factors[path] = (a, rng.standard_normal((RANK, group.out_features)).astype(np.float32) * 0.3)
    adapter = fit_factors(factors, layout)
    fused = component(tiny_checkpoint)
    fuse_qkv(fused.module)
    outs = []
    for comp in (plain, fused):
        sess = TorchAdapterSession(comp, layout, slots=2)
        sess.load(1, adapter)
        outs.append(sess.run(feeds, [1, 0, 1, 1], [1.0, 1.0, 0.5, 2.0]))
    assert np.abs(outs[0] - outs[1]).max() <= 1e-5
    assert np.abs(outs[0][0] - plain(feeds)[0]).max() > MIN_ADAPTER_EFFECT


def test_fp8_layers_take_the_branch(tiny_checkpoint, tiny_lora, second_lora, feeds) -> None:
    bf16 = TorchRuntime(device="cpu", dtype="bfloat16")
    ref = session(component(tiny_checkpoint, bf16), tiny_lora, second_lora)
    fp8 = component(tiny_checkpoint, TorchRuntime(device="cpu", dtype="bfloat16", fp8=True))
    assert quantize_fp8(fp8.module) > 0  # the branch set's layers are Fp8Linear now
    sess = loaded(TorchAdapterSession(fp8, ref.layout, slots=4), tiny_lora, second_lora)
    moved_ref = ref.run(feeds, SLOTS, SCALES) - ref.run(feeds, [0] * 4, [0.0] * 4)
    moved = sess.run(feeds, SLOTS, SCALES) - sess.run(feeds, [0] * 4, [0.0] * 4)
    for row in (0, 2, 3):  # an adapter moves an fp8 row the way it moves the bfloat16 one
        # fp8's own rounding bends the move (cosine 0.93-0.997 here); another row's move: below 0.2.
        a, b = moved[row].ravel(), moved_ref[row].ravel()
        cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert cosine > 0.9, (row, cosine)
    assert not moved[1].any()


# ----------------------------------------------------------------------------- export and the served model


def publish_torch(repo: Path, checkpoint: Path, lora: Path, settings: FluxSettings) -> None:
    env = {"FLUXSERVE_TORCH_DEVICE": "cpu", "FLUXSERVE_TORCH_DTYPE": "float32"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        publish_flux(repo, checkpoint=checkpoint, lora=lora, target="gpu-torch", settings=settings)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def torch_repo(tmp_path_factory, tiny_checkpoint: Path, tiny_lora: Path) -> Path:
    """A gpu-torch repository with the adapter branch, generate/1 running the local LoRA."""
    repo = tmp_path_factory.mktemp("torch-adapters") / "model_repository"
    settings = FluxSettings(build_dir=repo.parent / "build", adapter_branch=True, adapter_rank=RANK)
    publish_torch(repo, tiny_checkpoint, tiny_lora, settings)
    return repo


def test_gpu_torch_export_ships_the_cpu_exports_bank_layout(torch_repo: Path, tiny_checkpoint, base_pipeline) -> None:
    version = torch_repo / FLUX_TRANSFORMER / "1"
    layout = BankLayout.load(version)
    want = BankLayout.build(
        branch_layers(base_pipeline.transformer), RANK, "grouped", base_transformer_fingerprint(tiny_checkpoint)
    )
    assert layout == want and layout.base_fingerprint
    manifest = json.loads((version / "fluxserve_manifest.json").read_text())
    assert manifest["provenance"][ADAPTER_BRANCH]["rank"] == RANK
    config = parse_config((torch_repo / FLUX_TRANSFORMER / "config.pbtxt").read_text())
    optional = {i.name for i in config.input if i.optional}
    assert optional == {FLUX_ADAPTER_INPUT, SCALE_INPUT}
    assert int(config.parameters[ADAPTER_SLOTS_PARAMETER].string_value) >= 2
    assert config.parameters["runtime"].string_value == "torch"


def test_the_gpu_checks_reloaded_transformer_config_keeps_the_adapter_inputs(torch_repo: Path) -> None:
    """fluxserve-bench gpu reloads the transformer per config with a config it renders itself: it
    must take the inputs `generate` sends to a transformer with the branch."""
    from benchmarks.gpu import GpuBenchSettings, override_config

    published = parse_config((torch_repo / FLUX_TRANSFORMER / "config.pbtxt").read_text())
    for branch in (True, False):
        rendered = json.loads(override_config(GpuBenchSettings(device="cpu"), "bf16", FLUX_TRANSFORMER, branch))
        inputs = {i["name"] for i in rendered["input"]}
        assert (inputs == {i.name for i in published.input}) is branch, inputs
        assert ({FLUX_ADAPTER_INPUT, SCALE_INPUT} <= inputs) is branch


def test_gpu_torch_export_without_the_branch_keeps_the_plain_transformer(
    tmp_path: Path, tiny_checkpoint, tiny_lora
) -> None:
    repo = tmp_path / "model_repository"
    publish_torch(repo, tiny_checkpoint, tiny_lora, FluxSettings(build_dir=tmp_path / "build", adapter_branch=False))
    version = repo / FLUX_TRANSFORMER / "1"
    assert not (version / BANK_FILE).exists()
    assert ADAPTER_BRANCH not in json.loads((version / "fluxserve_manifest.json").read_text())["provenance"]
    config = parse_config((repo / FLUX_TRANSFORMER / "config.pbtxt").read_text())
    assert not {i.name for i in config.input} & {FLUX_ADAPTER_INPUT, SCALE_INPUT}
    comp = TorchComponent.load(FLUX_TRANSFORMER, version, CPU32)
    assert adapter_runner(comp, version, {}) is None


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeRequest:
    def __init__(self, inputs: dict[str, np.ndarray], parameters: dict[str, str]) -> None:
        self.inputs, self._parameters = inputs, parameters

    def parameters(self) -> str:
        return json.dumps(self._parameters)


def fake_pb_utils() -> types.ModuleType:
    """What serving/triton_torch.py uses of Triton's triton_python_backend_utils."""
    pb = types.ModuleType("triton_python_backend_utils")

    class TritonError(Exception):
        INVALID_ARG = "INVALID_ARG"

        def __init__(self, message: str, code: str | None = None) -> None:
            super().__init__(message)
            self.code = code

    class InferenceResponse:
        def __init__(self, output_tensors: list | None = None, error: TritonError | None = None) -> None:
            self.outputs = {t.name: t.array for t in output_tensors or []}
            self.error = error

    pb.TritonError = TritonError  # type: ignore[attr-defined]
    pb.InferenceResponse = InferenceResponse  # type: ignore[attr-defined]
    pb.Tensor = FakeTensor  # type: ignore[attr-defined]
    pb.get_input_tensor_by_name = lambda r, name: (  # type: ignore[attr-defined]
        FakeTensor(name, r.inputs[name]) if name in r.inputs else None
    )
    return pb


def request(feeds: dict[str, np.ndarray], row: int, adapter: str | None, scale: float = 1.0) -> FakeRequest:
    """One generation's transformer call as generate sends it ([1, 1] scalars; adapter inputs
    only when `adapter` is not None; the pipeline's LoRA named)."""
    inputs = {k: v[row : row + 1].reshape(1, 1) if v.ndim == 1 else v[row : row + 1] for k, v in feeds.items()}
    if adapter is not None:
        inputs[FLUX_ADAPTER_INPUT] = np.array([[adapter.encode()]], dtype=np.object_)
        inputs[SCALE_INPUT] = np.array([[scale]], np.float32)
    return FakeRequest(inputs, {FUSED_LORA_PARAMETER: f"{GENERATE.name}/1"})


def test_served_model_adds_adapters_by_name_on_top_of_the_patched_default_lora(
    torch_repo: Path, feeds, fused_pipeline, second_lora: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    monkeypatch.delitem(sys.modules, "serving.triton_torch", raising=False)
    triton_torch = importlib.import_module("serving.triton_torch")
    publish_adapter(second_lora, "second", repository=torch_repo, scale=0.5)
    model = triton_torch.TritonPythonModel()
    config = (torch_repo / FLUX_TRANSFORMER / "config.pbtxt").read_text()
    from google.protobuf import json_format

    model.initialize(
        {
            "model_config": json.dumps(
                json_format.MessageToDict(parse_config(config), preserving_proto_field_name=True)
            ),
            "model_repository": str(torch_repo / FLUX_TRANSFORMER),
            "model_version": "1",
        }
    )
    assert model.adapters is not None
    bank = {name: t.data_ptr() for name, t in model.adapters.session.bank.tensors.items()}
    responses = model.execute(
        [
            request(feeds, 0, "second", 0.5),
            request(feeds, 1, ""),
            request(feeds, 2, "no-such-adapter"),
            request(feeds, 3, None),  # a client that sends no adapter inputs: slot 0
        ]
    )
    assert responses[2].error is not None and responses[2].error.code == "INVALID_ARG"
    assert "no adapter named 'no-such-adapter'" in str(responses[2].error)
    default = TorchComponent(FLUX_TRANSFORMER, fused_pipeline.transformer, CPU32)(feeds)
    both = TorchComponent(FLUX_TRANSFORMER, fused_with(fused_pipeline.transformer, second_lora, 0.5), CPU32)(feeds)
    out = {i: responses[i].outputs["latent"][0] for i in (0, 1, 3)}
    assert np.abs(out[0] - both[0]).max() <= MAX_VS_FUSED  # the default LoRA in W, the adapter on the branch
    assert np.abs(out[0] - default[0]).max() > MIN_ADAPTER_EFFECT
    for row in (1, 3):
        assert np.abs(out[row] - default[row]).max() <= MAX_VS_FUSED, row
    assert model.adapters.loads == 1 and model.component.lora.patches == 1
    # loaded in place: the bank's tensors are the ones allocated at start
    assert {name: t.data_ptr() for name, t in model.adapters.session.bank.tensors.items()} == bank
    model.finalize()
