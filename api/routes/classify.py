"""POST /classify."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from api.auth import require_inference_key
from api.schemas import ClassifyBatchResponse, ClassifyRequest, ClassifyResult, ErrorResponse
from api.state import AppState, get_state
from contract.specs import CLASSIFY

router = APIRouter(tags=["classify"], dependencies=[Depends(require_inference_key)])

ERRORS = {422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}}


@router.post("/classify", response_model=ClassifyResult | ClassifyBatchResponse, responses=ERRORS)
async def classify(
    body: ClassifyRequest, state: Annotated[AppState, Depends(get_state)]
) -> ClassifyResult | ClassifyBatchResponse:
    texts = [body.text] if body.text is not None else list(body.texts or [])
    async with state.admission.classification(len(texts)):
        results = await state.classify(texts)
    state.readiness.served(CLASSIFY.name)
    threshold = await state.classify_threshold(results[0].model_version)
    out = [
        ClassifyResult(label=r.label, score=r.score, scores=r.scores, uncertain=r.score < threshold) for r in results
    ]
    state.metrics.items.labels("classify").inc(len(out))
    return out[0] if body.text is not None else ClassifyBatchResponse(results=out)
