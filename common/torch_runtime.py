"""The gpu-torch target's shared facts: how a FLUX component version is laid out, which options its
Triton config carries, and the file that holds a LoRA's low-rank factors beside base weights.

Export writes them (export/torch_target.py, export/flux/torch_export.py); the component model in
Triton reads them (serving/torch_components.py). Plain data: torch and safetensors are imported
only by the two LoRA file functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

RUNTIME_PARAMETER = "runtime"
"""A FLUX component's config parameter: "torch" runs serving/torch_components.py; absent, ONNX Runtime."""
TORCH_RUNTIME = "torch"
MODULE_DIR = "module"
"""Inside a version: the component's diffusers/transformers folder (config.json + safetensors)."""
LORA_FILE = "lora.safetensors"
"""Inside a version, optional: the LoRA factors the model adds to the base weights in place at load."""
RANDOM_INIT_FILE = "fluxserve_random_init.json"
"""In a MODULE_DIR instead of weights: {"seed": n}. The module is built from its config with seeded
random weights on the target device (the FLUX.1-dev-sized benchmark build: 12B parameters that
never touch a disk, while the compute is the real model's)."""

Dtype = Literal["bfloat16", "float16", "float32"]
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class TorchRuntime:
    """How a gpu-torch component runs. Rendered into its config's parameters as `torch_<field>`."""

    device: str = "cuda"
    """"cuda", "cuda:N" or "cpu" (CI runs the same code on CPU)."""
    dtype: Dtype = "bfloat16"
    compile_mode: CompileMode = "off"
    """torch.compile mode ("reduce-overhead" adds CUDA graphs); off: eager."""
    compile_backend: str = "inductor"
    """"eager" traces with dynamo but generates no code: the CPU dry run checks the compiled path in seconds."""
    fp8: bool = False
    """Transformer only: the blocks' Linear layers hold float8 (e4m3) weights with per-row scales."""
    fuse_qkv: bool = False
    """Transformer only: one q/k/v projection per attention (diffusers' fuse_qkv_projections)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {DTYPES}, not {self.dtype!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"torch_compile_mode must be one of {COMPILE_MODES}, not {self.compile_mode!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"torch_device must be cpu, cuda or cuda:N, not {self.device!r}")

    @property
    def on_host(self) -> bool:
        return self.device == "cpu"

    def parameters(self) -> dict[str, str]:
        """The config parameters that select this runtime (what `from_parameters` reads back)."""
        out = {RUNTIME_PARAMETER: TORCH_RUNTIME}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f"torch_{f.name}"] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> TorchRuntime:
        """Read a config's parameters (missing ones keep their defaults); ValueError on a bad value."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            raw = parameters.get(f"torch_{f.name}")
            if raw is None or raw == "":
                continue
            if isinstance(f.default, bool):
                if raw not in ("0", "1", "true", "false"):
                    raise ValueError(f"torch_{f.name} must be 0 or 1, not {raw!r}")
                kwargs[f.name] = raw in ("1", "true")
            else:
                kwargs[f.name] = raw
        return cls(**kwargs)


def is_torch_component(parameters: Mapping[str, str]) -> bool:
    return parameters.get(RUNTIME_PARAMETER) == TORCH_RUNTIME


LoraFactors = dict[str, tuple["torch.Tensor", "torch.Tensor", float]]
"""Layer path inside a component -> (down (rank, in), up (out, rank), scale): W += scale * up @ down."""


def save_lora_factors(path: Path, factors: LoraFactors) -> None:
    """Write factors as safetensors: `<layer>.down`, `<layer>.up` and `<layer>.scale` (shape [1])."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for layer, (down, up, scale) in factors.items():
        tensors[f"{layer}.down"] = down.detach().float().contiguous()
        tensors[f"{layer}.up"] = up.detach().float().contiguous()
        tensors[f"{layer}.scale"] = torch.tensor([float(scale)], dtype=torch.float32)
    save_file(tensors, str(path))


def load_lora_factors(path: Path) -> LoraFactors:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors})
    out: LoraFactors = {}
    for layer in layers:
        try:
            out[layer] = (tensors[f"{layer}.down"], tensors[f"{layer}.up"], float(tensors[f"{layer}.scale"][0]))
        except KeyError as e:
            raise ValueError(f"{path}: layer {layer} lacks {e.args[0]}") from e
    return out


MODULE_CLASSES: dict[str, tuple[str, str]] = {
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "T5EncoderModel"),
    "transformer": ("diffusers", "FluxTransformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}
"""FluxPipeline's class per checkpoint folder (contract.specs.FLUX_PIPELINE_SLOTS names the folders)."""
