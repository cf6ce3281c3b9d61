"""The gpu-torch target: the FLUX components in PyTorch inside Triton's python backend.

For the GPU machines this project can reach (CUDA PyTorch, no TensorRT, no onnxruntime-gpu): the
same model names, tensors, `generate` / `generate_stream` / `flux_prepare`, pinned versions and
step-level batching as the CPU target, with the four ONNX component models replaced by python
models that run diffusers' / transformers' modules (serving/torch_components.py). The classifier
is served as on the CPU target (ONNX Runtime on the host).

Knobs: `FLUXSERVE_TORCH_*` (TorchTargetSettings, read when instantiated); the rest of each
deployment (queue delays, generate instances) is ExportSettings' (FLUXSERVE_EXPORT_*).
"""

from __future__ import annotations

from dataclasses import replace

from pydantic_settings import BaseSettings, SettingsConfigDict

from common.torch_runtime import CompileMode, Dtype, TorchRuntime
from contract.specs import FLUX_COMPONENTS, FLUX_PIPELINE_SLOTS, FLUX_TRANSFORMER
from export.deployments import ExportSettings, flux_deployments
from export.triton_config import Deployment


class TorchTargetSettings(BaseSettings):
    """How the gpu-torch components run. Environment prefix: FLUXSERVE_TORCH_."""

    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_TORCH_")

    device: str = "cuda"
    """cuda, cuda:N, or cpu (CI and the benchmark's dry run run the same code on the host)."""
    dtype: Dtype = "bfloat16"
    compile_mode: CompileMode = "off"
    """torch.compile for the transformer and the VAE decoder (reduce-overhead: with CUDA graphs).
    Off by default: a compiled model pays its compilation at the first request of each batch size;
    `fluxserve-bench gpu` measures what it buys."""
    compile_backend: str = "inductor"
    fp8: bool = False
    """The transformer blocks' Linear layers in float8 with per-row scales (lossy: `fluxserve-bench
    gpu` measures it against bfloat16); needs a GPU of compute capability 8.9+ to be fast."""
    fuse_qkv: bool = False
    """One q/k/v projection per attention in the transformer (lossless)."""
    transformer_instances: int = 1
    """Each instance holds its own copy of the weights (FLUX.1-dev in bfloat16: 24 GB)."""

    def runtime(self, component: str) -> TorchRuntime:
        """The runtime of one component: fp8 and fused q/k/v are the transformer's; compile is the
        transformer's and the VAE's (the encoders run once per prompt)."""
        transformer = component == FLUX_TRANSFORMER
        compiled = transformer or FLUX_PIPELINE_SLOTS[component] == "vae"
        return TorchRuntime(
            device=self.device,
            dtype=self.dtype,
            compile_mode=self.compile_mode if compiled else "off",
            compile_backend=self.compile_backend,
            fp8=self.fp8 and transformer,
            fuse_qkv=self.fuse_qkv and transformer,
        )


def torch_flux_deployments(
    settings: ExportSettings | None = None, torch_settings: TorchTargetSettings | None = None
) -> dict[str, Deployment]:
    """flux_deployments with the four components as PyTorch python models (same batching)."""
    t = torch_settings or TorchTargetSettings()
    deps = flux_deployments(settings)
    for name in FLUX_COMPONENTS:
        deps[name] = replace(
            deps[name],
            kind="python",
            instance_count=t.transformer_instances if name == FLUX_TRANSFORMER else 1,
            parameters=t.runtime(name).parameters(),
        )
    return deps
