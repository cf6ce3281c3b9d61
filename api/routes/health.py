"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.state import AppState, get_state

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The facade process is alive (says nothing about Triton)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    """200 only when Triton is up and every required model is ready."""
    ready = await state.triton.is_ready(state.settings.required_models)
    body = {"ready": ready, "models": list(state.settings.required_models), "triton": state.settings.triton_grpc_url}
    return JSONResponse(status_code=200 if ready else 503, content=body)


@router.get("/metrics")
async def metrics(state: Annotated[AppState, Depends(get_state)]) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
