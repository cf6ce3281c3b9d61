"""Python clients for direct Triton gRPC use: `TritonClient` (sync) and `AsyncTritonClient`.

Both validate inputs against contract.specs before any network call, and raise only the
exceptions in contract.errors.
"""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import KeepAliveOptions
from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

from client.control_key import control_headers
from contract.codec import (
    ClassifyResult,
    GenerateProgress,
    GenerateResult,
    classify_inputs,
    decode_classify,
    decode_generate,
    decode_generate_stream,
    generate_inputs,
)
from contract.errors import FluxServeError, InferenceError, RequestTimeoutError, translate
from contract.specs import CLASSIFY, ENDPOINTS, GENERATE, GENERATE_STREAM, GenerateParams, random_seed

DEFAULT_URL = f"{ENDPOINTS.host}:{ENDPOINTS.triton_grpc_port}"


def channel_args(max_reconnect_backoff_s: float = 2.0) -> list[tuple[str, int]]:
    """tritonclient's own channel defaults, plus a short reconnect backoff: after a Triton restart
    gRPC's default backoff grows to 120 s, and the facade would stay 503 long after Triton is back."""
    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", int(max_reconnect_backoff_s * 1000)),
    ]


StreamEvent = tuple[GenerateProgress, GenerateResult | None]
"""One `generate_stream` response: progress after a step, and the image with the last one."""


def _rpc_error(e: grpc.RpcError) -> FluxServeError:
    """grpc.aio stream errors reach us untranslated by tritonclient: same mapping as the rest."""
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return translate(InferenceServerException(msg=details or str(code), status=str(code or "")))


def _config_parameter(config: dict, key: str) -> str | None:
    return config.get("config", config).get("parameters", {}).get(key, {}).get("string_value")


class TritonClient:
    """Blocking client. `timeout_s` bounds every inference call."""

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 60.0) -> None:
        self.url, self.timeout_s = url, timeout_s
        self._client = grpcclient.InferenceServerClient(url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_ready(self, models: Sequence[str] = (CLASSIFY.name,)) -> bool:
        try:
            return self._client.is_server_ready() and all(self._client.is_model_ready(m) for m in models)
        except InferenceServerException:
            return False

    def classify(self, texts: list[str]) -> list[ClassifyResult]:
        inputs, outputs = classify_inputs(list(texts))
        try:
            result = self._client.infer(CLASSIFY.name, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise translate(e) from e
        return decode_classify(result)

    def generate(self, params: GenerateParams) -> GenerateResult:
        """One image; a params without a seed gets a random one (the result says which)."""
        params = params.seeded()
        inputs, outputs = generate_inputs(params)
        try:
            result = self._client.infer(GENERATE.name, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise translate(e) from e
        return decode_generate(result, params.seed)

    def generate_stream(self, params: GenerateParams) -> Iterator[StreamEvent]:
        """Yields (progress, None) after every step, then (progress of the last step, result).
        Closing the iterator early cancels the request in Triton (the stream is cancelled)."""
        params = params.seeded()
        inputs, _ = generate_inputs(params, GENERATE_STREAM)
        answers: queue.Queue = queue.Queue()
        self._client.start_stream(
            callback=lambda result, error: answers.put((result, error)), stream_timeout=self.timeout_s
        )
        try:
            self._client.async_stream_infer(GENERATE_STREAM.name, inputs)
            while True:
                try:
                    result, error = answers.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise RequestTimeoutError(
                        f"no answer from {GENERATE_STREAM.name} within {self.timeout_s} s"
                    ) from None
                if error is not None:
                    raise translate(error) from error
                progress, done = decode_generate_stream(result, params.seed)
                yield progress, done
                if done is not None:
                    return
        except InferenceServerException as e:
            raise translate(e) from e
        finally:
            self._client.stop_stream(cancel_requests=True)


class AsyncTritonClient:
    """asyncio client (`tritonclient.grpc.aio`), one per process: it multiplexes one channel.

    Cancelling the task awaiting an inference cancels its gRPC call, and Triton marks the request
    cancelled (python models see `request.is_cancelled()`); `timeout_s` is both the gRPC deadline
    and the request timeout Triton passes to the model, so a model can stop at its deadline too.
    """

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 60.0) -> None:
        self.url, self.timeout_s = url, timeout_s
        self._client = aioclient.InferenceServerClient(url, channel_args=channel_args())
        # Model configs and reloads are behind Triton's control key; inference needs none.
        self._control = control_headers(grpc=True)

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self, models: Sequence[str] = (CLASSIFY.name,)) -> bool:
        try:
            if not await self._client.is_server_ready(client_timeout=2.0):
                return False
            for m in models:
                if not await self._client.is_model_ready(m, client_timeout=2.0):
                    return False
            return True
        except InferenceServerException:
            return False

    async def model_config(self, model: str, version: str = "") -> dict:
        """A deployed model version's config as JSON (config.pbtxt fields); version "" means the
        one Triton would pick now."""
        try:
            cfg = await self._client.get_model_config(
                model, version, headers=self._control, as_json=True, client_timeout=5.0
            )
        except InferenceServerException as e:
            raise translate(e) from e
        return cfg.get("config", cfg)

    async def model_parameter(self, model: str, key: str, version: str = "") -> str | None:
        """A parameter a deployed model version was published with (its config.pbtxt `parameters`)."""
        return _config_parameter(await self.model_config(model, version), key)

    async def reload_model(self, model: str, timeout_s: float = 300.0) -> None:
        """Unload and load `model` (explicit model control): restarts its stub processes."""
        try:
            await self._client.unload_model(model, headers=self._control, client_timeout=timeout_s)
            await self._client.load_model(model, headers=self._control, client_timeout=timeout_s)
        except InferenceServerException as e:
            raise translate(e) from e

    async def newest_ready_version(self, model: str) -> str | None:
        """The newest ready version of `model`: the one a request sent now without a version runs on."""
        try:
            meta = await self._client.get_model_metadata(model, as_json=True, client_timeout=5.0)
        except InferenceServerException as e:
            raise translate(e) from e
        versions = [v for v in meta.get("versions", []) if str(v).isdigit()]
        return max(versions, key=int) if versions else None

    async def classify(self, texts: list[str]) -> list[ClassifyResult]:
        inputs, outputs = classify_inputs(list(texts))
        try:
            result = await self._client.infer(CLASSIFY.name, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise translate(e) from e
        return decode_classify(result)

    async def generate(self, params: GenerateParams) -> GenerateResult:
        """One image; a params without a seed gets a random one (the result says which)."""
        params = params.seeded()
        inputs, outputs = generate_inputs(params)
        try:
            result = await self._client.infer(
                GENERATE.name, inputs, outputs=outputs, client_timeout=self.timeout_s, timeout=int(self.timeout_s * 1e6)
            )
        except InferenceServerException as e:
            raise translate(e) from e
        return decode_generate(result, params.seed)

    async def generate_stream(self, params: GenerateParams) -> AsyncIterator[StreamEvent]:
        """Yields (progress, None) after every step, then (progress of the last step, result). Leaving early
        (break, aclose, task cancelled) cancels the gRPC stream, and Triton stops the loop."""
        params = params.seeded()
        inputs, _ = generate_inputs(params, GENERATE_STREAM)

        async def one_request():
            yield {"model_name": GENERATE_STREAM.name, "inputs": inputs}

        responses = self._client.stream_infer(one_request(), stream_timeout=self.timeout_s)
        try:
            async for result, error in responses:
                if error is not None:
                    raise translate(error) from error
                progress, done = decode_generate_stream(result, params.seed)
                yield progress, done
                if done is not None:
                    return
            raise InferenceError(f"{GENERATE_STREAM.name} ended without an image")
        except InferenceServerException as e:
            raise translate(e) from e
        except grpc.RpcError as e:
            raise _rpc_error(e) from e
        finally:
            responses.cancel()


__all__ = [
    "AsyncTritonClient",
    "ClassifyResult",
    "FluxServeError",
    "GenerateParams",
    "GenerateProgress",
    "GenerateResult",
    "StreamEvent",
    "TritonClient",
    "random_seed",
]
