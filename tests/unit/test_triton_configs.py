"""Every generated config parses with Triton's own schema, on both targets."""

from __future__ import annotations

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from contract.specs import CLASSIFIER_ONNX, CLASSIFY, INLINE_ENCODER_PARAMETER
from export.deployments import INLINE_ENCODER_FILE, ExportSettings, all_deployments, classifier_deployments
from export.triton_config import config_text, parse_config
from tests.conftest import MODEL_REPOSITORY

DEPLOYMENTS = all_deployments()


@pytest.mark.parametrize("target", ["cpu", "gpu"])
@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_generated_config_parses(name: str, target: str) -> None:
    cfg = parse_config(config_text(DEPLOYMENTS[name], target))
    spec = DEPLOYMENTS[name].spec
    assert cfg.name == spec.name
    assert [i.name for i in cfg.input] == [t.name for t in spec.inputs]
    assert [o.name for o in cfg.output] == [t.name for t in spec.outputs]
    assert cfg.max_batch_size == spec.max_batch_size


def test_targets_differ_only_where_they_should() -> None:
    cpu = parse_config(config_text(DEPLOYMENTS[CLASSIFIER_ONNX.name], "cpu"))
    gpu = parse_config(config_text(DEPLOYMENTS[CLASSIFIER_ONNX.name], "gpu"))
    assert cpu.backend == "python" and gpu.platform == "onnxruntime_onnx"
    assert gpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert gpu.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert cpu.input == gpu.input and cpu.output == gpu.output and cpu.dynamic_batching == gpu.dynamic_batching
    # The python orchestration model is the same code on both targets.
    assert parse_config(config_text(DEPLOYMENTS[CLASSIFY.name], "gpu")).backend == "python"


def test_classify_encodes_inline_on_cpu_only() -> None:
    """CPU: `classify` runs the encoder itself, with exactly `classifier_onnx`'s runner knobs. GPU
    (TensorRT `classifier_onnx`) and `classify_encoder=bls`: no inline encoder, so the BLS call."""
    cpu = classifier_deployments(target="cpu")
    assert cpu[CLASSIFY.name].parameters[INLINE_ENCODER_PARAMETER] == INLINE_ENCODER_FILE
    runner_knobs = {k: v for k, v in cpu[CLASSIFY.name].parameters.items() if k != INLINE_ENCODER_PARAMETER}
    assert runner_knobs == cpu[CLASSIFIER_ONNX.name].parameters
    assert INLINE_ENCODER_PARAMETER not in classifier_deployments(target="gpu")[CLASSIFY.name].parameters
    bls = classifier_deployments(ExportSettings(classify_encoder="bls"), "cpu")
    assert INLINE_ENCODER_PARAMETER not in bls[CLASSIFY.name].parameters


def test_dynamic_batching_enabled_on_every_batchable_model() -> None:
    batchable = [d for d in DEPLOYMENTS.values() if d.spec.max_batch_size > 0]
    assert {d.spec.name for d in batchable} >= {"classify", "classifier_onnx", "flux_transformer"}
    for dep in batchable:
        assert parse_config(config_text(dep, "cpu")).HasField("dynamic_batching")


def test_written_repository_configs_parse() -> None:
    written = sorted(MODEL_REPOSITORY.glob("*/config.pbtxt"))
    if not written:
        pytest.skip("model repository not built (make models)")
    for path in written:
        cfg = parse_config(path.read_text())
        assert cfg.name == path.parent.name


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(Exception):
        parse_config('name: "x"\nnot_a_field: 1\n')


@pytest.mark.parametrize("target", ["cpu", "gpu"])
@pytest.mark.parametrize("name", ["classify", "generate"])
def test_public_models_reject_beyond_a_bounded_queue(name: str, target: str) -> None:
    """The public models' queues are bounded and reject (503 + Retry-After at the facade)."""
    dep = DEPLOYMENTS[name]
    policy = parse_config(config_text(dep, target)).dynamic_batching.default_queue_policy
    assert policy.max_queue_size == dep.max_queue_size > 0
    assert policy.timeout_action == mc.ModelQueuePolicy.REJECT
    assert policy.allow_timeout_override


def test_internal_models_never_reject_a_running_generation() -> None:
    """Components are called mid-generation over BLS: a rejection there would waste the steps done."""
    for name in ("flux_transformer", "flux_vae_decoder", "classifier_onnx"):
        cfg = parse_config(config_text(DEPLOYMENTS[name], "cpu"))
        assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 0
