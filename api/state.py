"""The facade's long-lived objects, typed, in one place: routes reach them through `get_state`.

`create_app` builds an `AppState`; the lifespan opens the Triton clients (they need the running
event loop) and closes them.
The rules of model work over these objects (admission, readiness evidence, trigger words,
thresholds, shared fate) are the services' (api.services), which create_app builds beside it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from api.admission import Admission, AdmissionSettings, deployed_model_facts
from api.auth_limit import FailedAuthLimiter
from api.classify_batcher import ClassifyBatcher
from api.keys import KeyRing
from api.metrics import ApiMetrics
from api.readiness import Readiness
from api.settings import ApiSettings
from api.shedding import LoopLag, RefusalPacer, Shedder
from api.triton_port import TritonFactory, TritonPort
from api.upload_gate import UploadSlots
from client.triton_client import AsyncTritonClient
from contract.specs import CLASSIFY_LIMITS
from training.jobs import JobSettings, JobStore


@dataclass
class AppState:
    settings: ApiSettings
    job_settings: JobSettings
    jobs: JobStore
    enqueue: Callable[[str], Any]
    metrics: ApiMetrics
    keyring: KeyRing
    """The operator keys (api.keys): required on /train, and on inference when configured."""
    auth_failures: FailedAuthLimiter = field(init=False)
    """Wrong operator keys per client (api.auth_limit), built from the settings."""
    uploads: UploadSlots = field(default_factory=UploadSlots)
    """POST /train uploads in progress (api.upload_gate), capped by max_concurrent_uploads."""
    # Opened by the lifespan: they bind to the running event loop.
    triton_factory: TritonFactory = AsyncTritonClient
    """How the lifespan makes its Triton clients: AsyncTritonClient, or a test's fake (api.triton_port)."""
    triton: TritonPort | None = None
    triton_generate: TritonPort | None = None
    readiness: Readiness | None = None
    classify_batcher: ClassifyBatcher | None = None
    """None when FLUXSERVE_API_CLASSIFY_CALLS_INFLIGHT=0 (one Triton call per request)."""
    admission: Admission | None = None
    loop_lag: LoopLag | None = None
    admission_settings: AdmissionSettings = field(default_factory=AdmissionSettings)
    shedder: Shedder | None = None
    """The early refusal's decision and answers (api/shedding.py), built by create_app."""
    pacer: RefusalPacer = field(init=False)
    """Holds the 503s of clients that retry at once (api/shedding.py), built from admission_settings."""
    stopping: asyncio.Event | None = None
    """Set when the server begins to stop: in-flight generations end with 503 (api/cancellation.py)."""
    _loop: asyncio.AbstractEventLoop | None = None

    def __post_init__(self) -> None:
        self.auth_failures = FailedAuthLimiter(self.settings.auth_failure_burst, self.settings.auth_failure_refill_s)
        a = self.admission_settings
        # The refusal budget is the deployment's: each of several facade processes paces its share.
        budget = a.shed_refusal_budget_per_s / self.settings.workers
        self.pacer = RefusalPacer(budget, a.shed_max_hold_s, a.shed_retry_window_s)

    async def open(self) -> None:
        s = self.settings
        self.triton = self.triton_factory(s.triton_grpc_url, s.classify_timeout_s)
        self.triton_generate = self.triton_factory(s.triton_grpc_url, s.generate_timeout_s)
        self.readiness = Readiness(self.triton_generate, s.ready_probe_interval_s)
        if s.classify_calls_inflight > 0:
            self.classify_batcher = ClassifyBatcher(
                self.triton.classify,
                CLASSIFY_LIMITS.max_texts_per_request,
                s.classify_calls_inflight,
                self.metrics.classify_call_texts.observe,
            )
        self.admission = Admission(self.admission_settings, lambda: deployed_model_facts(self.triton), s.workers)
        self.stopping = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.loop_lag = LoopLag()
        self.loop_lag.start()

    def lag_s(self) -> float:
        """How late the event loop runs now (0 before the lifespan starts the measurement)."""
        return self.loop_lag.lag_s if self.loop_lag is not None else 0.0

    def begin_shutdown(self) -> None:
        """Safe from a signal handler or another thread."""
        if self._loop is not None and self.stopping is not None:
            self._loop.call_soon_threadsafe(self.stopping.set)

    async def close(self) -> None:
        if self.loop_lag is not None:
            await self.loop_lag.stop()
        for client in (self.triton, self.triton_generate):
            if client is not None:
                await client.close()


def app_state(request: Request) -> AppState:
    return request.app.state.fluxserve


async def get_state(request: Request) -> AppState:
    """FastAPI dependency: `state: Annotated[AppState, Depends(get_state)]`. A coroutine on
    purpose: FastAPI runs a plain `def` dependency in its thread pool, and that hand-off cost about
    a tenth of the facade's event-loop time per /classify request."""
    return app_state(request)
