"""The client refuses bad input before any network call, and translates Triton errors once."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from client.triton_client import TritonClient
from contract.errors import (
    InferenceError,
    InvalidInputError,
    ModelNotReadyError,
    RequestTimeoutError,
    ServerUnavailableError,
    translate,
)
from contract.specs import CLASSIFY_LIMITS, GenerateParams
from tests.conftest import free_port


@pytest.fixture()
def dead_client():
    # Nothing listens here: any call that reached the network would raise ServerUnavailableError.
    with TritonClient(f"127.0.0.1:{free_port()}", timeout_s=2) as c:
        yield c


@pytest.mark.parametrize(
    "texts",
    [
        [],
        [""],
        ["   "],
        ["x" * (CLASSIFY_LIMITS.max_text_chars + 1)],
        ["ok"] * (CLASSIFY_LIMITS.max_texts_per_request + 1),
        [3],
    ],
)
def test_bad_texts_refused_locally(dead_client: TritonClient, texts: list) -> None:
    with pytest.raises(InvalidInputError):
        dead_client.classify(texts)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 100},
        {"height": 8},
        {"width": 4096},
        {"steps": 0},
        {"steps": 1000},
        {"guidance": -1.0},
        {"guidance": float("nan")},
    ],
)
def test_bad_generate_refused_locally(dead_client: TritonClient, kwargs: dict) -> None:
    args = {"width": 64, "height": 64, "steps": 2, "guidance": 3.5, **kwargs}
    # model_construct skips pydantic's checks: the client checks again before anything is sent.
    with pytest.raises(InvalidInputError):
        dead_client.generate(GenerateParams.model_construct(prompt="a fox", seed=1, **args))


def test_good_input_reaches_network(dead_client: TritonClient) -> None:
    with pytest.raises(ServerUnavailableError):
        dead_client.classify(["hello"])


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", ServerUnavailableError),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", RequestTimeoutError),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'classify' is not found", ModelNotReadyError),
        ("StatusCode.INVALID_ARGUMENT", "text must not be empty", InvalidInputError),
        ("StatusCode.INTERNAL", "onnxruntime failed: boom", InferenceError),
    ],
)
def test_translate(status: str, message: str, expected: type) -> None:
    err = translate(InferenceServerException(msg=message, status=status))
    assert isinstance(err, expected)
    assert message in str(err)
