"""Admission control, the cost model, stop checks and error translation for overload/cancel."""

from __future__ import annotations

import asyncio

import pytest
from tritonclient.utils import InferenceServerException

from api.admission import Admission, AdmissionSettings, CostQueue, ModelFacts
from contract.cost import MAX_CONTRACT_COST_MPS, TransformerShape, generate_cost_mps, transformer_peak_bytes
from contract.errors import (
    InvalidInputError,
    ModelFailedError,
    OverloadedError,
    RequestCancelledError,
    ServerUnavailableError,
    translate,
)
from serving.stop_check import Stopped, stop_check

SMALL_MODEL = TransformerShape(attention_heads=4, text_tokens=64)


def test_cost_counts_images_and_steps() -> None:
    assert generate_cost_mps(1000, 1000, 10) == 10.0
    assert generate_cost_mps(1000, 1000, 10, images=3) == 30.0
    assert MAX_CONTRACT_COST_MPS == generate_cost_mps(2048, 2048, 100, 4)


def test_memory_estimate_matches_the_reported_oom() -> None:
    """Issue 15: 2000x1920, 2 images grew the small model's transformer stub to ~16 GB."""
    estimate = transformer_peak_bytes(2000, 1920, 2, SMALL_MODEL)
    assert 10 * 2**30 < estimate < 20 * 2**30
    assert transformer_peak_bytes(128, 128, 1, SMALL_MODEL) < 2**20


def test_lone_request_always_admitted_then_sheds_with_retry_after() -> None:
    q = CostQueue("generation", "mps", max_wait_s=2.0, initial_rate=1.0, smoothing=0.3)
    q.admit(50.0)  # far beyond max_wait alone: still served, nothing is ahead of it
    with pytest.raises(OverloadedError) as info:
        q.admit(1.0)
    assert info.value.retry_after_s >= 1.0 and "retry" in str(info.value)
    q.release(50.0, completed=False)
    q.admit(1.0)
    q.admit(1.0)  # 2 s of work in flight at 1/s: within 2 s
    with pytest.raises(OverloadedError):
        q.admit(1.0)  # 3 s


def test_floor_admits_one_full_batch_whatever_the_estimate() -> None:
    """A bound below one batch at capacity would starve the batcher (issue 24: 0.04 s at ~900
    texts/s let 36 texts in, so 32 clients were refused 19 times in 20)."""
    q = CostQueue("classification", "texts", max_wait_s=0.04, initial_rate=100.0, smoothing=0.3, floor=64.0)
    for _ in range(64):
        q.admit(1.0)  # 0.64 s at the estimate, but within one batch
    with pytest.raises(OverloadedError):
        q.admit(1.0)


def test_capacity_estimate_falls_slowly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals that take CPU from serving make the measured rate dip; the limit must not follow
    the dip at once (that feedback collapsed goodput), but does follow a lasting loss."""
    now = [100.0]
    monkeypatch.setattr("api.admission.time.monotonic", lambda: now[0])
    q = CostQueue(
        "classification", "texts", max_wait_s=1.0, initial_rate=1.0, smoothing=1.0, floor=2.0, half_life_s=10.0
    )

    def serve(per_second: float, seconds: float) -> None:  # busy throughout: one more always queued
        for _ in range(int(per_second * seconds)):
            q.admit(1.0)
            now[0] += 1.0 / per_second
            q.release(1.0, completed=True)

    q.admit(1.0)
    serve(100.0, 2.0)
    assert q.rate == pytest.approx(100.0) and q.capacity() == pytest.approx(100.0)
    serve(25.0, 1.0)  # a dip to a quarter for a second
    assert q.rate == pytest.approx(25.0)
    assert q.capacity() > 90.0 and q.limit() > 90.0
    serve(25.0, 30.0)  # three half-lives later: the estimate has come down to what is measured
    assert q.capacity() < 25.0 * 1.2


def test_typical_cost_follows_admitted_requests() -> None:
    q = CostQueue("generation", "mps", max_wait_s=5.0, initial_rate=1.0, smoothing=0.3)
    for _ in range(60):
        q.admit(0.5)
        q.release(0.5, completed=False)
    assert q.typical_cost == pytest.approx(0.5, rel=0.01)


def test_rate_follows_measured_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("api.admission.time.monotonic", lambda: now[0])
    q = CostQueue("classification", "texts", max_wait_s=1.0, initial_rate=1.0, smoothing=0.5)
    for _ in range(20):  # 10 texts per second, sustained
        q.admit(1.0)
        now[0] += 0.1
        q.release(1.0, completed=True)
    assert q.rate == pytest.approx(10.0, rel=0.01)
    q.admit(1.0)
    now[0] += 5.0
    q.release(1.0, completed=False)  # cancelled work says nothing about throughput
    assert q.rate == pytest.approx(10.0, rel=0.01)


def _admission(**settings: object) -> Admission:
    async def facts() -> ModelFacts:
        return ModelFacts(on_gpu=False, shape=SMALL_MODEL)

    return Admission(AdmissionSettings(**settings), facts)


def test_oversized_generation_is_422_with_the_limit() -> None:
    admission = _admission(cpu_generate_max_cost_mps=16.0)

    async def ask() -> None:
        async with admission.generation(2000, 1920, 47, 2):
            pytest.fail("admitted")

    with pytest.raises(InvalidInputError, match="limit of 16.0"):
        asyncio.run(ask())
    assert admission.generate.in_flight == 0


def test_memory_guard_refuses_what_would_oom_even_within_the_cost_limit() -> None:
    admission = _admission(generate_max_cost_mps=1e6, generate_memory_budget_mb=8192)

    async def ask() -> None:
        async with admission.generation(2000, 1920, 1, 2):
            pytest.fail("admitted")

    with pytest.raises(InvalidInputError, match="MiB"):
        asyncio.run(ask())


def test_gpu_deployment_allows_the_contract_range() -> None:
    admission = _admission()
    assert admission.max_cost_mps(ModelFacts(on_gpu=True, shape=SMALL_MODEL)) == MAX_CONTRACT_COST_MPS
    assert admission.max_cost_mps(ModelFacts(on_gpu=False, shape=SMALL_MODEL)) == 16.0


def test_admitted_work_is_released_on_failure() -> None:
    admission = _admission()

    async def fail() -> None:
        async with admission.generation(128, 128, 4, 2):
            assert admission.generate.in_flight == generate_cost_mps(128, 128, 4, 2)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        asyncio.run(fail())
    assert admission.generate.in_flight == 0 and admission.memory.in_flight == 0


def test_stop_check() -> None:
    cancelled = [False]
    now = [0.0]
    check = stop_check(lambda: cancelled[0], timeout_us=2_000_000, clock=lambda: now[0])
    check(1, 10)
    now[0] = 2.5
    with pytest.raises(Stopped, match="deadline"):
        check(2, 10)
    cancelled[0] = True
    with pytest.raises(Stopped, match="cancelled"):
        stop_check(lambda: cancelled[0])()


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", OverloadedError),
        (
            "StatusCode.UNAVAILABLE",
            "generation failed: flux_transformer: Stub process 'flux_transformer_0_0' is not healthy.",
            ModelFailedError,
        ),
        ("StatusCode.CANCELLED", "Locally cancelled by application!", RequestCancelledError),
    ],
)
def test_translate_overload_and_failures(status: str, message: str, expected: type) -> None:
    err = translate(InferenceServerException(msg=message, status=status))
    assert isinstance(err, expected)
    if isinstance(err, ServerUnavailableError):
        assert err.retry_after_s > 0
    if isinstance(err, ModelFailedError):
        assert err.model == "flux_transformer"


def test_early_shed_follows_the_queue_and_the_event_loop_lag() -> None:
    from api.shedding import should_shed

    q = CostQueue("classification", "texts", max_wait_s=0.25, initial_rate=100.0, smoothing=0.3, floor=10.0)
    assert not should_shed(q, lag_s=0.0)  # idle
    for _ in range(24):
        q.admit(1.0)  # 0.24 s ahead
    assert not should_shed(q, lag_s=0.0)
    q.admit(1.0)  # 0.25 s ahead: a typical (1-text) request more would wait too long
    assert should_shed(q, lag_s=0.0)
    q.release(10.0, completed=False)  # 15 texts, 0.15 s
    assert not should_shed(q, lag_s=0.05)
    assert should_shed(q, lag_s=0.15)  # the loop is late too: together over the bound
    assert should_shed(q, lag_s=5.0)  # but the floor (10 texts) stays admitted whatever the lag:
    q.release(6.0, completed=False)
    assert not should_shed(q, lag_s=5.0)
    q.release(9.0, completed=False)
    assert not should_shed(q, lag_s=50.0)  # nothing in flight: a lone request is served


def test_loop_lag_sees_a_blocked_event_loop() -> None:
    import time

    from api.shedding import LoopLag

    async def main() -> tuple[float, float]:
        lag = LoopLag(interval_s=0.005, smoothing=1.0)
        lag.start()
        await asyncio.sleep(0.05)
        quiet = lag.lag_s
        time.sleep(0.3)  # the loop is blocked: the next timer fires ~0.3 s late
        blocked, until = 0.0, time.monotonic() + 0.05
        while time.monotonic() < until:  # every loop iteration, while the timer catches up
            await asyncio.sleep(0)
            blocked = max(blocked, lag.lag_s)
        await lag.stop()
        return quiet, blocked

    quiet, blocked = asyncio.run(main())
    assert blocked >= 0.25 and quiet < blocked


def test_dispatch_gate_is_fifo_and_never_over_capacity() -> None:
    from api.admission import DispatchGate

    async def run() -> tuple[list[str], int]:
        gate = DispatchGate()
        gate.resize(3)
        order: list[str] = []
        most = 0
        release = asyncio.Event()

        async def request(name: str, images: int) -> None:
            nonlocal most
            async with gate.held(images):
                order.append(name)
                most = max(most, gate.out)
                await release.wait()

        tasks = [asyncio.create_task(request(n, k)) for n, k in [("a", 2), ("b", 2), ("c", 1), ("d", 1)]]
        await asyncio.sleep(0)
        assert order == ["a"]  # b needs 2 of the 1 left; c and d queue behind b (first in, first out)
        gone = asyncio.create_task(request("gone", 1))
        await asyncio.sleep(0)
        gone.cancel()  # a caller that leaves while waiting takes no slot
        release.set()
        await asyncio.gather(*tasks)
        assert gate.out == 0 and not gate._waiting
        return order, most

    order, most = asyncio.run(run())
    assert order == ["a", "b", "c", "d"] and most <= 3


def test_deployed_facts_read_triton_slots_and_the_torch_device() -> None:
    from api.admission import deployed_model_facts

    class Configs:
        def __init__(self, transformer: dict) -> None:
            self.transformer = transformer

        async def model_config(self, model: str) -> dict:
            if model == "generate":
                return {
                    "instance_group": [{"count": 4}],
                    "dynamic_batching": {"default_queue_policy": {"max_queue_size": 8}},
                }
            return self.transformer

    cpu = asyncio.run(deployed_model_facts(Configs({"backend": "python"})))  # type: ignore[arg-type]
    assert cpu.triton_slots == 8 and not cpu.on_gpu
    torch_cuda = {"backend": "python", "parameters": {"torch_device": {"string_value": "cuda:0"}}}
    assert asyncio.run(deployed_model_facts(Configs(torch_cuda))).on_gpu  # type: ignore[arg-type]
    assert asyncio.run(deployed_model_facts(Configs({"platform": "onnxruntime_onnx"}))).on_gpu  # type: ignore[arg-type]
