"""The facade's long-lived objects, typed, in one place: routes reach them through `get_state`.

`create_app` builds an `AppState`; the lifespan opens the Triton clients (they need the running
event loop) and closes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from api.metrics import ApiMetrics
from api.settings import ApiSettings
from client.contract import CLASSIFY, GENERATE, THRESHOLD_PARAMETER, TRIGGER_PARAMETER
from client.triton_client import AsyncTritonClient
from training.jobs import JobSettings, JobStore

DEFAULT_THRESHOLD = 0.5
"""Uncertainty threshold for a classifier published without one."""


@dataclass
class VersionedParameter:
    """A deployed model's config parameter (config.pbtxt `parameters`), cached per model version.

    A hot swap publishes a new version with its own value (a new classifier's threshold, a new
    LoRA's trigger words); keying by version means the value always matches the weights that
    answered, with no time-to-live to tune."""

    model: str
    key: str
    values: dict[str, str | None] = field(default_factory=dict)

    async def get(self, client: AsyncTritonClient, version: str) -> str | None:
        if version not in self.values:
            self.values[version] = await client.model_parameter(self.model, self.key, version)
        return self.values[version]


@dataclass
class AppState:
    settings: ApiSettings
    job_settings: JobSettings
    jobs: JobStore
    enqueue: Callable[[str], Any]
    metrics: ApiMetrics
    thresholds: VersionedParameter = field(default_factory=lambda: VersionedParameter(CLASSIFY.name, THRESHOLD_PARAMETER))
    triggers: VersionedParameter = field(default_factory=lambda: VersionedParameter(GENERATE.name, TRIGGER_PARAMETER))
    # Opened by the lifespan: they bind to the running event loop.
    triton: AsyncTritonClient | None = None
    triton_generate: AsyncTritonClient | None = None
    generate_slots: asyncio.Semaphore | None = None

    async def open(self) -> None:
        s = self.settings
        self.triton = AsyncTritonClient(s.triton_grpc_url, s.classify_timeout_s)
        self.triton_generate = AsyncTritonClient(s.triton_grpc_url, s.generate_timeout_s)
        self.generate_slots = asyncio.Semaphore(s.max_concurrent_generations)

    async def close(self) -> None:
        for client in (self.triton, self.triton_generate):
            if client is not None:
                await client.close()

    async def classify_threshold(self, version: str) -> float:
        """The override from settings, else what `classify` version `version` was published with."""
        if self.settings.classify_threshold is not None:
            return self.settings.classify_threshold
        value = await self.thresholds.get(self.triton, version)
        return float(value) if value else DEFAULT_THRESHOLD

    async def trigger_word(self) -> str:
        """The trigger words of the LoRA in the newest ready `generate` version (the one a request
        sent now runs on), else the configured default."""
        version = await self.triton.newest_ready_version(GENERATE.name)
        value = await self.triggers.get(self.triton, version) if version else None
        return value or self.settings.trigger_word


def get_state(request: Request) -> AppState:
    """FastAPI dependency: `state: Annotated[AppState, Depends(get_state)]`."""
    return request.app.state.fluxserve
