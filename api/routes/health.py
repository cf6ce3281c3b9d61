"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from api.auth import optional_operator
from api.errors import retry_after
from api.readiness import NotReady
from api.state import AppState, get_state
from api.triton_metrics import fetch_prompt_cache_metrics
from contract.errors import DEFAULT_RETRY_AFTER_S

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The facade process is alive (says nothing about Triton)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    """200 only when a request would succeed: Triton up, every required model ready and proven by
    a recent inference (api/readiness.py); models whose stub died are reported and reloaded. A
    deliberate 503 otherwise (load balancers read the status; the fuzz tests accept this 503).

    The body says why in a fixed vocabulary (api.readiness.NotReady), per required model and in
    `reason` (the first one); the details (Triton's errors, a dead stub's message) go to the log:
    /readyz is public, and what fails inside is nobody's business outside."""
    models = list(state.settings.required_models)
    if state.stopping is not None and state.stopping.is_set():
        reason: NotReady | None = NotReady.SHUTTING_DOWN
        problems = dict.fromkeys(models, reason)
    else:
        problems = await state.readiness.check(models)
        reason = next(iter(problems.values()), None)
    state.readiness.report(problems)
    body: dict[str, object] = {"ready": reason is None, "models": models}
    if reason is not None:
        body |= {"reason": reason, "problems": problems}
    return JSONResponse(
        status_code=200 if reason is None else 503,
        content=body,
        headers=None if reason is None else retry_after(DEFAULT_RETRY_AFTER_S),
    )


@router.get("/metrics")
async def metrics(
    state: Annotated[AppState, Depends(get_state)], operator: Annotated[str | None, Depends(optional_operator)]
) -> Response:
    """The facade's Prometheus metrics. The prompt cache's counters only with the operator key:
    they move when anyone's prompt was seen before, so a stranger could test whether someone
    recently sent prompt P (scrape with `authorization: {credentials: <key>}` to get them)."""
    s = state.settings
    extra = await fetch_prompt_cache_metrics(s.triton_metrics_url, s.triton_metrics_timeout_s) if operator else ""
    return Response(state.metrics.exposition() + extra.encode(), media_type=CONTENT_TYPE_LATEST)
