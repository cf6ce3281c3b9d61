"""Python clients for direct Triton gRPC use: `TritonClient` (sync) and `AsyncTritonClient`.

Both validate inputs against client.contract before any network call, and raise only the
exceptions in client.errors.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from client.codec import (
    ClassifyResult,
    GenerateResult,
    classify_inputs,
    decode_classify,
    decode_generate,
    generate_inputs,
)
from client.contract import CLASSIFY, ENDPOINTS, GENERATE, GENERATE_DEFAULTS
from client.errors import FluxServeError, translate

DEFAULT_URL = f"{ENDPOINTS.host}:{ENDPOINTS.triton_grpc_port}"


def random_seed() -> int:
    return secrets.randbelow(2**31)


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

    def generate(
        self,
        prompt: str,
        seed: int | None = None,
        width: int = GENERATE_DEFAULTS.width,
        height: int = GENERATE_DEFAULTS.height,
        steps: int = GENERATE_DEFAULTS.steps,
        guidance: float = GENERATE_DEFAULTS.guidance,
    ) -> GenerateResult:
        seed = random_seed() if seed is None else seed
        inputs, outputs = generate_inputs(prompt, seed, width, height, steps, guidance)
        try:
            result = self._client.infer(GENERATE.name, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise translate(e) from e
        return decode_generate(result, seed)


class AsyncTritonClient:
    """asyncio client (`tritonclient.grpc.aio`), one per process: it multiplexes one channel."""

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 60.0) -> None:
        self.url, self.timeout_s = url, timeout_s
        self._client = aioclient.InferenceServerClient(url)

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

    async def model_parameter(self, model: str, key: str, version: str = "") -> str | None:
        """A parameter a deployed model version was published with (its config.pbtxt `parameters`);
        version "" means the one Triton would pick now."""
        try:
            cfg = await self._client.get_model_config(model, version, as_json=True, client_timeout=5.0)
        except InferenceServerException as e:
            raise translate(e) from e
        return _config_parameter(cfg, key)

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

    async def generate(
        self,
        prompt: str,
        seed: int,
        width: int = GENERATE_DEFAULTS.width,
        height: int = GENERATE_DEFAULTS.height,
        steps: int = GENERATE_DEFAULTS.steps,
        guidance: float = GENERATE_DEFAULTS.guidance,
    ) -> GenerateResult:
        inputs, outputs = generate_inputs(prompt, seed, width, height, steps, guidance)
        try:
            result = await self._client.infer(GENERATE.name, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise translate(e) from e
        return decode_generate(result, seed)


__all__ = ["AsyncTritonClient", "ClassifyResult", "FluxServeError", "GenerateResult", "TritonClient"]
