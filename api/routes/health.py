"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.errors import retry_after
from api.state import AppState, get_state
from api.triton_metrics import fetch_prompt_cache_metrics
from client.errors import DEFAULT_RETRY_AFTER_S

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The facade process is alive (says nothing about Triton)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    """200 only when a request would succeed: Triton up, every required model ready and proven by
    a recent inference (api/readiness.py); models whose stub died are reported and reloaded. A
    deliberate 503 otherwise (load balancers read the status; the fuzz tests accept this 503)."""
    ready, problems = await state.readiness.check(state.settings.required_models)
    # No addresses here: /readyz is public, and where Triton listens is nobody's business outside.
    body = {"ready": ready, "models": list(state.settings.required_models)}
    if problems:
        body["problems"] = problems
    return JSONResponse(
        status_code=200 if ready else 503, content=body, headers=None if ready else retry_after(DEFAULT_RETRY_AFTER_S)
    )


@router.get("/metrics")
async def metrics(state: Annotated[AppState, Depends(get_state)]) -> Response:
    s = state.settings
    extra = await fetch_prompt_cache_metrics(s.triton_metrics_url, s.triton_metrics_timeout_s)
    return Response(generate_latest(state.metrics.registry) + extra.encode(), media_type=CONTENT_TYPE_LATEST)
