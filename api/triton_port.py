"""What the facade needs of Triton, as a protocol: `client.triton_client.AsyncTritonClient` in
service, a fake in the in-process tests (tests/unit/facade/), both passed to `api.app.create_app`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from contract.codec import ClassifyResult, GenerateProgress, GenerateResult
from contract.specs import CLASSIFY, GenerateParams


class TritonPort(Protocol):
    async def is_ready(self, models: Sequence[str] = (CLASSIFY.name,)) -> bool: ...

    async def classify(self, texts: list[str]) -> list[ClassifyResult]: ...

    async def generate(self, params: GenerateParams) -> GenerateResult: ...

    def generate_stream(
        self, params: GenerateParams
    ) -> AsyncIterator[tuple[GenerateProgress, GenerateResult | None]]: ...

    async def model_config(self, model: str, version: str = "") -> dict: ...

    async def model_parameter(self, model: str, key: str, version: str = "") -> str | None: ...

    async def newest_ready_version(self, model: str) -> str | None: ...

    async def reload_model(self, model: str, timeout_s: float = 300.0) -> None: ...

    async def close(self) -> None: ...


TritonFactory = Callable[[str, float], TritonPort]
"""(gRPC url, timeout in seconds) -> a client; called in the lifespan, on the running loop."""
