"""FLUX components in PyTorch for the gpu-torch target: the python-backend replacement for the ONNX models.

A version folder of `flux_text_encoder`, `flux_text_encoder_2`, `flux_transformer` or
`flux_vae_decoder` holds the component's diffusers/transformers folder (`module/`, hard links of
the checkpoint's files) and, when a LoRA is fixed to the component (CLIP's), `lora.safetensors`
with the LoRA's low-rank factors. `TorchComponent.load` builds the module on the configured device
and dtype, adds `scale * up @ down` to the adapted Linear weights in place on the device (no fused
copy is written or read), then applies what the runtime asks for the transformer (fused q/k/v, fp8
Linear layers) and torch.compile. The transformer's LoRA is not part of its version: each call
names the pipeline version whose LoRA it runs with, and the loaded transformer patches its own
weights to it in place (`TorchComponent.lora`, serving/torch_lora.py). Calls take and return
numpy arrays named and shaped as the ONNX graphs' (the contract's FLUX_IO_NAMES), so `generate`,
`flux_prepare` and the dynamic batcher are unchanged: `TorchComponent` also answers the three ONNX
Runtime session methods BatchedOnnxRunner uses, and that runner merges a batch of Triton requests
into one forward pass exactly as on the CPU target.

Nothing here is CUDA-only: CI runs the same code with device=cpu on the local checkpoints.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from common.torch_runtime import (
    LORA_FILE,
    MODULE_CLASSES,
    MODULE_DIR,
    RANDOM_INIT_FILE,
    TorchRuntime,
    load_lora_factors,
)
from contract.specs import FLUX_COMPONENTS, FLUX_IO_NAMES, FLUX_PIPELINE_SLOTS, FLUX_SCALAR_INPUTS, FLUX_TRANSFORMER
from serving.torch_lora import FUSED_ROWS, LoraSwitch, add_lora

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
SEPARATE_PROJECTIONS = tuple(FUSED_ROWS)
"""What diffusers' fuse_qkv_projections leaves beside the fused ones (the fused forward never reads them)."""
FP8_SKIP = ("norm",)
"""Transformer Linear layers left in the compute dtype: the blocks' modulation (`norm*.linear`)
multiplies one row per image, where an fp8 GEMM gains nothing and needs 16-row operands."""


def module_class(slot: str) -> type:
    package, name = MODULE_CLASSES[slot]
    return getattr(importlib.import_module(package), name)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _from_config(cls: type, folder: Path) -> torch.nn.Module:
    """A module of `cls` built from `folder`'s config.json, with freshly initialised weights."""
    if hasattr(cls, "config_class"):  # transformers: the constructor initialises the weights
        return cls(cls.config_class.from_pretrained(folder))
    return cls.from_config(cls.load_config(folder))


def build_on_meta(slot: str, folder: Path) -> torch.nn.Module:
    """The module's structure without memory (shapes, layer names, parameter counts)."""
    with torch.device("meta"):
        return _from_config(module_class(slot), folder)


def load_module(slot: str, folder: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The component in `folder` on `device` in `dtype`, in eval mode and without gradients.

    A folder with RANDOM_INIT_FILE instead of weights is built with seeded random weights directly
    on the device (the same seed gives the same weights in every process on the same device)."""
    cls = module_class(slot)
    marker = folder / RANDOM_INIT_FILE
    if marker.exists():
        torch.manual_seed(int(json.loads(marker.read_text())["seed"]))
        with torch.device(device), _default_dtype(dtype):
            module = _from_config(cls, folder)
    else:
        key = "dtype" if hasattr(cls, "config_class") else "torch_dtype"  # transformers 5 / diffusers
        module = cls.from_pretrained(folder, **{key: dtype}).to(device)
    return module.eval().requires_grad_(False)


class Fp8Linear(torch.nn.Module):
    """A Linear layer with float8 (e4m3) weights, one scale per output row, and activations
    quantized per row at each call: `torch._scaled_mm` (an fp8 tensor-core GEMM on Ada/Hopper GPUs;
    CPU torch has a reference kernel, so CI runs this same code)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", (weight / scale).to(FP8_DTYPE))
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out), as _scaled_mm wants
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        quantized = (rows.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        out = torch._scaled_mm(
            quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=x.dtype
        )
        return out.reshape(*x.shape[:-1], self.out_features)


@torch.no_grad()
def fuse_qkv(transformer: torch.nn.Module) -> int:
    """diffusers' fuse_qkv_projections, then the separate projections dropped: it keeps them, and on
    FLUX.1-dev they are 4.3 GB in bfloat16 (and fp8 would quantize them too). Returns how many went."""
    transformer.fuse_qkv_projections()
    dropped = 0
    for module in transformer.modules():
        if getattr(module, "fused_projections", False):
            for name in SEPARATE_PROJECTIONS:
                if isinstance(getattr(module, name, None), torch.nn.Linear):
                    delattr(module, name)
                    dropped += 1
    return dropped


def fp8_layers(transformer: torch.nn.Module) -> list[str]:
    """The transformer blocks' Linear layers that Fp8Linear replaces."""
    return [
        name
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
        and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        and not any(part.startswith(FP8_SKIP) for part in name.split("."))
    ]


@torch.no_grad()
def quantize_fp8(transformer: torch.nn.Module) -> int:
    """Swap the blocks' Linear layers for Fp8Linear in place; returns how many were swapped."""
    names = fp8_layers(transformer)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = transformer.get_submodule(parent)
        setattr(owner, child, Fp8Linear(getattr(owner, child)))
    return len(names)


def fp8_tensor_cores(device: torch.device) -> bool:
    """True where fp8 GEMMs run on tensor cores (CUDA compute capability 8.9+); elsewhere fp8 runs
    but only as a reference (CPU) or not at all (older GPUs)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def compile_in_place(module: torch.nn.Module, runtime: TorchRuntime) -> None:
    """torch.compile the module's forward in place (nn.Module.compile), so every caller (this
    component, an in-process FluxPipeline holding the same module) runs the compiled code."""
    kwargs: dict[str, Any] = {"backend": runtime.compile_backend}
    if runtime.compile_backend == "inductor" and runtime.compile_mode != "default":
        kwargs["mode"] = runtime.compile_mode
    module.compile(**kwargs)


class _Io(NamedTuple):
    """What BatchedOnnxRunner reads of an ONNX Runtime NodeArg: a name and a shape of the right rank."""

    name: str
    shape: tuple[str, ...]


class TorchComponent:
    """One FLUX component on a device, called with the contract's batch-major numpy arrays."""

    def __init__(
        self, name: str, module: torch.nn.Module, runtime: TorchRuntime, lora: LoraSwitch | None = None
    ) -> None:
        self.name, self.module, self.runtime = name, module, runtime
        self.lora = lora
        """The transformer's: which LoRA its weights hold, switched per call (None: takes no LoRA)."""
        self.device = torch.device(runtime.device)
        self.dtype: torch.dtype = getattr(torch, runtime.dtype)
        self.input_names, (self.output_name,) = FLUX_IO_NAMES[name]
        spec = FLUX_COMPONENTS[name]
        # Per-item scalars reach the model flat ([B]); everything else keeps the batch axis.
        self._inputs = [
            _Io(t.name, ("batch",) * (1 if t.name in FLUX_SCALAR_INPUTS else len(t.dims) + 1)) for t in spec.inputs
        ]

    @classmethod
    def load(cls, name: str, version_dir: Path, runtime: TorchRuntime) -> TorchComponent:
        """Build the component of a version folder (see the module docstring for the order of steps)."""
        started = time.monotonic()
        slot = FLUX_PIPELINE_SLOTS[name]
        device, dtype = torch.device(runtime.device), getattr(torch, runtime.dtype)
        module = load_module(slot, Path(version_dir) / MODULE_DIR, device, dtype)
        facts: dict[str, object] = {"device": str(device), "dtype": runtime.dtype}
        lora = Path(version_dir) / LORA_FILE
        if lora.exists():
            facts["lora_layers"] = add_lora(module, load_lora_factors(lora))
        if name == FLUX_TRANSFORMER:
            if runtime.fuse_qkv:
                facts["fused_qkv_dropped"] = fuse_qkv(module)
            if runtime.fp8:
                facts["fp8_layers"] = quantize_fp8(module)
        if runtime.compile_mode != "off":
            # The two components that run per step or per image; the encoders run once per prompt.
            if name == FLUX_TRANSFORMER:
                compile_in_place(module, runtime)
            elif slot == "vae":
                compile_in_place(module.decoder, runtime)
            facts["compile"] = f"{runtime.compile_mode}/{runtime.compile_backend}"
        log.info("%s loaded in %.1fs: %s", name, time.monotonic() - started, facts)
        # version_dir is <repository>/<name>/<version>: the pipelines' LoRA files are read from there.
        lora = LoraSwitch(module, Path(version_dir).parent.parent, name) if name == FLUX_TRANSFORMER else None
        return cls(name, module, runtime, lora)

    # ------------------------------------------------------------------ calls

    def _tensor(self, name: str, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        return t if name == "input_ids" else t.to(self.dtype)

    def _forward(self, f: Mapping[str, torch.Tensor]) -> torch.Tensor:
        slot = FLUX_PIPELINE_SLOTS[self.name]
        m = self.module
        if slot == "text_encoder":
            return m(f["input_ids"], output_hidden_states=False).pooler_output
        if slot == "text_encoder_2":
            return m(f["input_ids"], output_hidden_states=False)[0]
        if slot == "vae":
            return m.decode(f["latent"], return_dict=False)[0]
        # Batch-major ids for Triton; every row of a merged batch is equal (same image and text size).
        return m(
            hidden_states=f["hidden_states"],
            encoder_hidden_states=f["encoder_hidden_states"],
            pooled_projections=f["pooled_projections"],
            timestep=f["timestep"],
            img_ids=f["img_ids"][0],
            txt_ids=f["txt_ids"][0],
            guidance=f["guidance"] if m.config.guidance_embeds else None,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def __call__(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The component's one output (float32 numpy) for feeds named as in the contract."""
        tensors = {n: self._tensor(n, feeds[n]) for n in self.input_names if n in feeds}
        return self._forward(tensors).float().cpu().numpy()

    # ------------------------------------------------------------------ ONNX Runtime session face

    def get_inputs(self) -> list[_Io]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Io]:
        return [_Io(self.output_name, ())]

    def run(self, output_names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [self(feeds)]


def load_components(
    repo: Path, pins: Mapping[str, int], runtimes: Mapping[str, TorchRuntime]
) -> dict[str, TorchComponent]:
    """The four components of a repository's pinned versions (the in-process pipeline of a benchmark)."""
    return {name: TorchComponent.load(name, Path(repo) / name / str(pins[name]), runtimes[name]) for name in runtimes}
