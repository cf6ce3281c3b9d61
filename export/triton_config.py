"""Triton model configs generated from one deployment spec per model.

A `Deployment` says what a model is (its public `ModelSpec` from contract.specs), whether it is
python orchestration or an ONNX compute model, and how it is batched. `render_config` turns it
into Triton's own `ModelConfig` protobuf for a target:

* cpu: every model runs in the python backend; ONNX models through ONNX Runtime's CPU provider
  (serving/triton_onnx.py), because the only Triton build that runs here has no ORT backend.
* gpu: ONNX models become `onnxruntime_onnx` with the TensorRT accelerator (or `tensorrt_plan`
  when an engine was built); the python orchestration models stay the same code.
* gpu-torch: every model is python, as on cpu; the FLUX components are PyTorch python models
  (export/torch_target.py renders their Deployments).

Both targets come from the same Deployment, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from contract.specs import ModelSpec, TensorSpec

Target = Literal["cpu", "gpu", "gpu-torch"]
TORCH_TARGET: Target = "gpu-torch"
Kind = Literal["python", "onnx"]


@dataclass(frozen=True)
class DynamicBatching:
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0


@dataclass(frozen=True)
class Deployment:
    spec: ModelSpec
    kind: Kind
    instance_count: int = 1
    dynamic_batching: DynamicBatching | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    gpu_engine: Literal["onnxruntime_trt", "tensorrt_plan"] = "onnxruntime_trt"
    # Tensors whose per-request shape is [1] but that the model consumes as a flat [B] vector.
    flatten_inputs: tuple[str, ...] = ()
    versions_live: int = 1
    """Newest versions kept loaded; 2 keeps the previous one serving in-flight pinned calls."""
    max_queue_size: int = 0
    """Requests allowed to wait for an instance; beyond it Triton rejects at once ("Exceeds maximum
    queue size", UNAVAILABLE: 503 + Retry-After at the facade) instead of queueing into a timeout.
    Requests whose own timeout passes while queued are rejected too. 0: unbounded."""


_DTYPE = {
    name: getattr(mc, name)
    for name in ("TYPE_STRING", "TYPE_FP32", "TYPE_FP16", "TYPE_INT32", "TYPE_INT64", "TYPE_UINT8", "TYPE_BOOL")
}


def _tensor(t: TensorSpec, flat: bool, is_input: bool) -> mc.ModelInput | mc.ModelOutput:
    cls = mc.ModelInput if is_input else mc.ModelOutput
    msg = cls(name=t.name, data_type=_DTYPE[t.dtype], dims=list(t.dims))
    if is_input and t.optional:
        msg.optional = True
    if flat:
        msg.reshape.shape[:] = []  # [B, 1] on the wire, [B] to the model
    return msg


def render_config(dep: Deployment, target: Target) -> mc.ModelConfig:
    """The ModelConfig protobuf for `dep` on `target`."""
    spec = dep.spec
    cfg = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    on_gpu_engine = target == "gpu" and dep.kind == "onnx"
    if on_gpu_engine and dep.gpu_engine == "tensorrt_plan":
        cfg.platform = "tensorrt_plan"
    elif on_gpu_engine:
        cfg.platform = "onnxruntime_onnx"
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        acc.parameters["precision_mode"] = "FP16"
        acc.parameters["max_workspace_size_bytes"] = str(4 << 30)
    else:
        cfg.backend = "python"
    cfg.input.extend(_tensor(t, t.name in dep.flatten_inputs, True) for t in spec.inputs)
    cfg.output.extend(_tensor(t, False, False) for t in spec.outputs)
    kind = mc.ModelInstanceGroup.KIND_GPU if on_gpu_engine else mc.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(count=dep.instance_count, kind=kind)
    if dep.dynamic_batching is not None and spec.max_batch_size > 0:
        cfg.dynamic_batching.preferred_batch_size[:] = list(dep.dynamic_batching.preferred_batch_sizes)
        cfg.dynamic_batching.max_queue_delay_microseconds = dep.dynamic_batching.max_queue_delay_us
    if dep.max_queue_size > 0:
        # The queue policy lives in the dynamic batcher; with max_batch_size 0 it batches nothing
        # and only bounds the queue.
        policy = cfg.dynamic_batching.default_queue_policy
        policy.max_queue_size = dep.max_queue_size
        policy.timeout_action = mc.ModelQueuePolicy.REJECT
        policy.allow_timeout_override = True
    if spec.decoupled:
        cfg.model_transaction_policy.decoupled = True
    for key, value in dep.parameters.items():
        cfg.parameters[key].string_value = value
    # A re-export adds version N+1 and Triton swaps to it; older ones unload after in-flight work.
    cfg.version_policy.latest.num_versions = dep.versions_live
    return cfg


def config_text(dep: Deployment, target: Target) -> str:
    return text_format.MessageToString(render_config(dep, target))


def parse_config(text: str) -> mc.ModelConfig:
    """Parse a config.pbtxt with Triton's own schema (raises on any unknown field)."""
    return text_format.Parse(text, mc.ModelConfig())
