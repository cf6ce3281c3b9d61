"""The FastAPI facade: validate, translate to Triton gRPC, map errors.

`create_app` is the factory; long-lived objects (the async gRPC clients, metrics, settings, the job
store, the operator keys) live in one typed `api.state.AppState`, opened and closed by the lifespan
and reached by routes through the `get_state` dependency; the model work goes through one service
per kind (api.services: generation, classification), which the routes only adapt to HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.body_limit import BodyLimitMiddleware
from api.errors import install_error_handlers
from api.host_check import HostCheckMiddleware, allowed_hosts
from api.job_liveness import reap_forever
from api.keys import load_keyring
from api.metrics import ApiMetrics, MetricsMiddleware
from api.request_id import RequestIdMiddleware, configure_logging
from api.routes import health, inference, loras, playground, train
from api.services.classification import ClassificationService
from api.services.generation import GenerationService
from api.settings import ApiSettings
from api.shedding import EarlyShed, Shedder, ShedRoute
from api.slow_clients import guarded_protocol, raise_open_file_limit
from api.state import AppState
from api.triton_port import TritonFactory
from api.worker_pool import CONFIG_ERROR_EXIT, listening_socket, per_worker, supervise, worker_index
from client.control_key import control_key
from client.triton_client import AsyncTritonClient
from common.collector import freeze_startup_objects
from common.secret_strength import SecretConfigError
from training.jobs import JobSettings, make_huey
from training.stores import job_store
from training.tasks import register_tasks

log = logging.getLogger(__name__)
MULTIPART_OVERHEAD_BYTES = 64 * 1024
"""POST /train bodies may exceed the upload limit by this much: boundaries and the form fields."""


def create_app(settings: ApiSettings | None = None, triton: TritonFactory = AsyncTritonClient) -> FastAPI:
    """The facade. `triton` makes its Triton clients: the real gRPC client, or a fake that satisfies
    api.triton_port.TritonPort (the in-process tests drive the whole app against one)."""
    # One of several facade processes enforces its share of every limit (api.worker_pool).
    settings = per_worker(settings or ApiSettings())
    control_key()  # sent to read model configs: a placeholder FLUXSERVE_TRITON_CONTROL_KEY is refused at start
    job_settings = JobSettings()
    # Training jobs: records in the job store, the queue in huey; the facade only enqueues.
    state = AppState(
        settings=settings,
        job_settings=job_settings,
        jobs=job_store(job_settings),
        enqueue=register_tasks(make_huey(job_settings), job_settings),
        metrics=ApiMetrics(),
        triton_factory=triton,
        keyring=load_keyring(settings.keys.get_secret_value() if settings.keys else None, settings.key_file),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.open()
        log.info("facade talking to Triton at %s", settings.triton_grpc_url)
        reaper = asyncio.create_task(reap_forever(state.jobs, state.job_settings))
        try:
            yield
        finally:
            reaper.cancel()
            await state.close()

    app = FastAPI(
        title="fluxserve",
        version="0.1.0",
        lifespan=lifespan,
        description="FLUX.1-dev image generation and an image-request classifier, served by Triton.",
        # FastAPI's native OpenTelemetry asks the global providers (an environment lookup) on every
        # request (docs/decisions/classify-facade-overhead.md). /metrics carries our counts.
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.fluxserve = state
    # One service per kind of model work, over the state (api.services): routes reach them through
    # their dependencies (generation_service, classification_service).
    app.state.generation = GenerationService(state)
    app.state.classification = ClassificationService(state)
    upload_limit = job_settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES

    def body_limit(method: str, path: str) -> int:
        return upload_limit if (method, path.rstrip("/")) == ("POST", "/train") else settings.max_json_body_bytes

    # Added innermost first: request id, metrics (so 413s are counted), Host check, body limit.
    # Early shedding is added last, so it wraps them all (api/shedding.py): a refusal costs nothing
    # of theirs, and counts itself under its route.
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit)
    # Host allow-list (DNS rebinding) before any work, inside metrics so refusals are counted.
    app.add_middleware(HostCheckMiddleware, allowed=allowed_hosts(settings.allowed_hosts, settings.host))
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware)
    state.shedder = Shedder(
        admission=lambda: state.admission,
        lag_s=state.lag_s,
        routes={
            "/classify": ShedRoute(lambda a: a.classify, state.metrics.counter("/classify", "POST", 503)),
            "/generate": ShedRoute(lambda a: a.generate, state.metrics.counter("/generate", "POST", 503)),
        },
        pacer=state.pacer,
    )
    app.add_middleware(EarlyShed, shedder=state.shedder)
    install_error_handlers(app)
    # Routes are matched in order: the high-rate one (/classify) first. Every route that runs a
    # model is on the inference router, behind the inference key.
    app.include_router(inference.router)
    app.include_router(health.router)
    app.include_router(train.router)
    app.include_router(loras.router)
    app.include_router(playground.router)
    return app


STOP_GRACE_S = 3
"""On SIGINT/SIGTERM in-flight generations are cancelled (503) and the server waits this long for
connections to finish before it cancels what is left."""


def serve(settings: ApiSettings) -> None:
    """Run the facade until SIGINT/SIGTERM (`python -m api.app`, `make up`): alone, or as one of
    the processes api.worker_pool starts, on a socket the others bind too."""
    import uvicorn

    app = create_app(settings)
    settings = app.state.fluxserve.settings  # this process's share of the limits

    class Server(uvicorn.Server):
        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets=sockets)  # the lifespan has opened the clients
            freeze_startup_objects()

        def handle_exit(self, sig: int, frame: object) -> None:
            app.state.fluxserve.begin_shutdown()  # end in-flight work now, with an answer
            super().handle_exit(sig, frame)

    # uvloop and httptools (pinned in pyproject) are picked up by uvicorn's "auto" defaults; the
    # protocol is httptools' with bounds on slow and many clients (api/slow_clients.py).
    # log_config=None: uvicorn's lines go through our handler, request id included.
    raise_open_file_limit(settings.max_connections + 1024)  # + Triton channels, files, logs
    Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="info",
            access_log=settings.access_log,
            timeout_graceful_shutdown=STOP_GRACE_S,
            log_config=None,
            http=guarded_protocol(
                settings.header_timeout_s,
                settings.body_timeout_s,
                settings.body_min_bytes_per_s,
                settings.max_connections,
                # Refusals in the protocol, before uvicorn builds a request for the app (the same
                # decision EarlyShed makes; a storm's refusals are most of what the loop does).
                app.state.fluxserve.shedder,
            ),
            # Connections wait in the kernel's queue while the loop is busy; a burst of
            # thousands of clients must not be refused at connect (uvicorn's default is 2048).
            backlog=4096,
        )
    ).run(sockets=None if worker_index() is None else [listening_socket(settings.host, settings.port)])


def main() -> None:
    configure_logging()
    try:
        settings = ApiSettings()
        if settings.workers > 1 and worker_index() is None:
            raise SystemExit(supervise(settings))
        serve(settings)
    except KeyboardInterrupt:  # uvicorn re-raises the stop signal after a clean shutdown
        pass
    except SecretConfigError as e:  # the message names the variable or file to fix: no traceback
        log.error("not starting: %s", e)
        raise SystemExit(CONFIG_ERROR_EXIT) from None


if __name__ == "__main__":
    main()
