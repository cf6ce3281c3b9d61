"""The FastAPI facade: validate, translate to Triton gRPC, map errors.

`create_app` is the factory; long-lived objects (the async gRPC clients, metrics, settings, the job
store) live in one typed `api.state.AppState`, opened and closed by the lifespan and reached by routes
through the `get_state` dependency.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.metrics import ApiMetrics, MetricsMiddleware
from api.routes import classify, generate, health, train
from api.settings import ApiSettings
from api.state import AppState
from training.jobs import JobSettings, job_store, make_huey
from training.tasks import register_tasks

log = logging.getLogger(__name__)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    job_settings = JobSettings()
    # Training jobs: records in the job store, the queue in huey; the facade only enqueues.
    state = AppState(
        settings=settings,
        job_settings=job_settings,
        jobs=job_store(job_settings),
        enqueue=register_tasks(make_huey(job_settings), job_settings),
        metrics=ApiMetrics(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.open()
        log.info("facade talking to Triton at %s", settings.triton_grpc_url)
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(title="fluxserve", version="0.1.0", lifespan=lifespan,
                  description="FLUX.1-dev image generation and an image-request classifier, served by Triton.")
    app.state.fluxserve = state
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(classify.router)
    app.include_router(generate.router)
    app.include_router(train.router)
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
