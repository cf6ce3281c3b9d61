"""The FastAPI facade: validate, translate to Triton gRPC, map errors.

`create_app` is the factory; long-lived objects (the one async gRPC client, metrics, settings)
live on `app.state` and are opened/closed by the lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.metrics import ApiMetrics, MetricsMiddleware
from api.routes import chat, classify, generate, health, playground, train
from api.settings import ApiSettings
from client.triton_client import AsyncTritonClient
from training.jobs import JobSettings, job_store, make_huey
from training.tasks import register_tasks

log = logging.getLogger(__name__)
DEFAULT_THRESHOLD = 0.5
TRIGGER_TTL_S = 5.0


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.triton = AsyncTritonClient(settings.triton_grpc_url, settings.classify_timeout_s)
        app.state.triton_generate = AsyncTritonClient(settings.triton_grpc_url, settings.generate_timeout_s)
        app.state.generate_slots = asyncio.Semaphore(settings.max_concurrent_generations)
        log.info("facade talking to Triton at %s", settings.triton_grpc_url)
        try:
            yield
        finally:
            await app.state.triton.close()
            await app.state.triton_generate.close()

    app = FastAPI(title="fluxserve", version="0.1.0", lifespan=lifespan,
                  description="FLUX.1-dev image generation and an image-request classifier, served by Triton.")
    app.state.settings = settings
    # Training jobs: records in SQLite, the queue in huey; the facade only enqueues.
    job_settings = JobSettings()
    app.state.job_settings = job_settings
    app.state.jobs = job_store(job_settings)
    app.state.enqueue = register_tasks(make_huey(job_settings), job_settings)
    app.state.metrics = ApiMetrics()
    app.state.threshold_cache = None

    async def classify_threshold() -> float:
        """Override from settings, else what the deployed classifier was published with."""
        if settings.classify_threshold is not None:
            return settings.classify_threshold
        if app.state.threshold_cache is None:
            app.state.threshold_cache = await app.state.triton.classify_threshold() or DEFAULT_THRESHOLD
        return app.state.threshold_cache

    app.state.classify_threshold = classify_threshold
    trigger_cache: dict[str, tuple[float, str]] = {}

    async def trigger_word() -> str:
        """The deployed LoRA's trigger words (re-read every few seconds: a re-export changes them)."""
        cached = trigger_cache.get("value")
        if cached and time.monotonic() - cached[0] < TRIGGER_TTL_S:
            return cached[1]
        value = await app.state.triton.trigger_word() or settings.trigger_word
        trigger_cache["value"] = (time.monotonic(), value)
        return value

    app.state.trigger_word = trigger_word
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(classify.router)
    app.include_router(generate.router)
    app.include_router(train.router)
    app.include_router(chat.router)
    app.include_router(playground.router)
    return app


def main() -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ApiSettings()
    # uvloop and httptools (pinned in pyproject) are picked up by uvicorn's "auto" defaults.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                access_log=settings.access_log)


if __name__ == "__main__":
    main()
