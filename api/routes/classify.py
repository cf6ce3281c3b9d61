"""POST /classify."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from api.auth import require_inference_key
from api.schemas import ClassifyBatchResponse, ClassifyRequest, ClassifyResult, ErrorResponse

router = APIRouter(tags=["classify"], dependencies=[Depends(require_inference_key)])

ERRORS = {422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}}


@router.post("/classify", response_model=ClassifyResult | ClassifyBatchResponse, responses=ERRORS)
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResult | ClassifyBatchResponse:
    state = request.app.state
    texts = [body.text] if body.text is not None else list(body.texts or [])
    results = await state.triton.classify(texts)
    threshold = await state.classify_threshold()
    out = [ClassifyResult(label=r.label, score=r.score, scores=r.scores, uncertain=r.score < threshold) for r in results]
    state.metrics.items.labels("classify").inc(len(out))
    return out[0] if body.text is not None else ClassifyBatchResponse(results=out)
