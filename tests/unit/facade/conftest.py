"""Fixtures of the in-process facade tests (tests/unit/facade/harness.py): every test gets a job
store and an adapter store of its own in a temporary folder, a FakeTriton, and `facade`, the app running against it
with the default settings; `facade_with(**settings)` opens one with other settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from tests.unit.facade.fake_triton import FakeTriton
from tests.unit.facade.harness import Facade, running_facade


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _jobs_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXSERVE_JOBS_JOBS_DIR", str(tmp_path / "jobs"))
    # The adapter store lies beside the repository (common.adapter_store.adapters_dir): a test's own,
    # so DELETE /loras can never reach the checkout's adapters.
    monkeypatch.setenv("FLUXSERVE_JOBS_MODEL_REPOSITORY", str(tmp_path / "serving" / "model_repository"))
    for name in ("FLUXSERVE_JOBS_REDIS_URL", "FLUXSERVE_API_KEYS", "FLUXSERVE_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake() -> FakeTriton:
    return FakeTriton()


@pytest.fixture
async def facade(fake: FakeTriton) -> AsyncIterator[Facade]:
    async with running_facade(fake) as f:
        yield f


@pytest.fixture
def facade_with(fake: FakeTriton) -> Callable[..., AbstractAsyncContextManager[Facade]]:
    """`async with facade_with(require_key_for_inference=True) as f:` (the same `fake`)."""

    def open_facade(**settings: Any) -> AbstractAsyncContextManager[Facade]:
        return running_facade(fake, **settings)

    return open_facade
