"""POST /classify."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from api.state import AppState, get_state
from api.schemas import ClassifyBatchResponse, ClassifyRequest, ClassifyResult, ErrorResponse

router = APIRouter(tags=["classify"])

ERRORS = {422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}}


@router.post("/classify", response_model=ClassifyResult | ClassifyBatchResponse, responses=ERRORS)
async def classify(body: ClassifyRequest, state: Annotated[AppState, Depends(get_state)]) -> ClassifyResult | ClassifyBatchResponse:
    texts = [body.text] if body.text is not None else list(body.texts or [])
    results = await state.triton.classify(texts)
    threshold = await state.classify_threshold(results[0].model_version)
    out = [ClassifyResult(label=r.label, score=r.score, scores=r.scores, uncertain=r.score < threshold) for r in results]
    state.metrics.items.labels("classify").inc(len(out))
    return out[0] if body.text is not None else ClassifyBatchResponse(results=out)
