"""Streamed generation: Triton's decoupled `generate_stream` model, SSE on POST /generate, and
cancellation when the client goes away (the work stops in Triton). The facade's SSE framing
(events per step and image, the final answer equal to the JSON one, refusals as the JSON envelope)
is checked in-process in tests/unit/facade/test_http_answers.py and test_http_validation.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from client.triton_client import TritonClient
from contract.errors import InvalidInputError
from contract.specs import FLUX_TRANSFORMER, GENERATE_STREAM, GenerateParams
from export.flux.transformer_precision import MAX_MEAN_ABS_PIXEL
from tests.conftest import triton_metric

pytestmark = pytest.mark.integration

PROMPT = "Super Realism, a red fox in snow"
SMALL = {"width": 64, "height": 64, "steps": 3}
LONG = {"width": 128, "height": 128, "steps": 100}
"""Far longer than the few steps a test waits for before it walks away."""


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """Same seed, same pipeline: the same image, though not always bit for bit. The int8
    transformer quantizes activations per call, so a step that shared its batch with another
    request's step (a readiness probe, a generation a test walked away from) rounds a little
    differently. Another seed or pipeline differs by tens of levels; the export holds int8 to within
    MAX_MEAN_ABS_PIXEL of fp32."""
    assert a.shape == b.shape
    diff = float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
    assert diff <= MAX_MEAN_ABS_PIXEL, f"mean |pixel difference| {diff:.2f}"


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a server-sent event stream, as they arrive."""
    name, data = "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line == "" and data:
            yield name, json.loads("\n".join(data))
            name, data = "message", []


def wait_until_stable(read, deadline_s: float = 120.0, quiet_polls: int = 4, poll_s: float = 0.5) -> float:
    """Poll `read()` until it returns the same value `quiet_polls` times in a row; that value."""
    deadline = time.monotonic() + deadline_s
    last, same = read(), 0
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        now = read()
        same = same + 1 if now == last else 0
        last = now
        if same >= quiet_polls:
            return now
    raise AssertionError(f"still changing after {deadline_s}s (last value {last})")


@pytest.fixture(scope="module")
def client(triton):
    with TritonClient(triton.grpc_url, timeout_s=300) as c:
        yield c


@pytest.fixture(scope="module")
def target_client(target_triton):
    """A client of each target's Triton in turn (tests/integration/conftest.py: cpu, gpu-torch)."""
    with TritonClient(target_triton.grpc_url, timeout_s=300) as c:
        yield c


def test_one_progress_response_per_step_then_the_image(target_client) -> None:
    client = target_client
    events = list(client.generate_stream(GenerateParams(prompt=PROMPT, seed=5, **SMALL)))
    # A response after each step, then the image (decoded after the last step) with the last step.
    assert [p.step for p, _ in events] == [1, 2, 3, 3]
    assert all(p.total == 3 for p, _ in events)
    assert all(r is None for _, r in events[:-1])
    elapsed = [p.elapsed_s for p, _ in events]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    final = events[-1][1]
    assert final is not None and final.image.shape == (64, 64, 3) and final.image.dtype == np.uint8
    # The same pipeline on the same pinned components as the unary model: the same image.
    unary = client.generate(GenerateParams(prompt=PROMPT, seed=5, **SMALL))
    assert_same_image(final.image, unary.image)
    assert final.model_version == unary.model_version


def test_stream_refuses_bad_input_before_sending(client) -> None:
    # Made without its checks (GenerateParams(...) itself refuses width 65): the client checks again.
    bad = GenerateParams.model_construct(prompt=PROMPT, seed=1, width=65, height=64, steps=2)
    with pytest.raises(InvalidInputError, match="width"):
        next(client.generate_stream(bad))


def _transformer_count(triton) -> float:
    return triton_metric(triton.metrics_url, "nv_inference_count", FLUX_TRANSFORMER)


def _assert_work_stopped(triton, before: float, steps_seen: int) -> None:
    settled = wait_until_stable(lambda: _transformer_count(triton))
    ran = settled - before
    # Cancellation is checked after every step: a few steps may finish in flight, not all 100.
    assert steps_seen <= ran < LONG["steps"] // 2, (
        f"{ran} transformer steps ran after walking away at step {steps_seen}"
    )


def test_closing_the_python_stream_stops_the_work_in_triton(target_triton, target_client) -> None:
    triton, client = target_triton, target_client
    wait_until_stable(lambda: _transformer_count(triton))
    before = _transformer_count(triton)
    stream = client.generate_stream(GenerateParams(prompt=PROMPT, seed=3, **LONG))
    for progress, _ in stream:
        if progress.step >= 2:
            break
    stream.close()
    _assert_work_stopped(triton, before, 2)


def test_http_client_disconnect_stops_the_work_in_triton(triton, facade) -> None:
    wait_until_stable(lambda: _transformer_count(triton))
    before = _transformer_count(triton)
    body = {"prompt": "a red fox in snow", "seed": 4, **LONG}
    with (
        facade.client(300) as http,
        http.stream("POST", "/generate", json=body, headers={"accept": "text/event-stream"}) as r,
    ):
        for name, data in sse_events(r):
            assert name == "progress"
            if data["step"] >= 2:
                break  # leaving the block closes the connection mid-stream
    _assert_work_stopped(triton, before, 2)
    # And the server is fine afterwards: the next stream completes.
    with (
        facade.client(300) as http,
        http.stream(
            "POST", "/generate", json={"prompt": "ok", "seed": 1, **SMALL}, headers={"accept": "text/event-stream"}
        ) as r,
    ):
        assert [n for n, _ in sse_events(r)][-1] == "image"


def test_stream_model_is_exported_decoupled() -> None:
    from export.triton_config import parse_config
    from tests.conftest import MODEL_REPOSITORY

    cfg = parse_config((MODEL_REPOSITORY / GENERATE_STREAM.name / "config.pbtxt").read_text())
    assert cfg.model_transaction_policy.decoupled
    assert [o.name for o in cfg.output] == [t.name for t in GENERATE_STREAM.outputs]
