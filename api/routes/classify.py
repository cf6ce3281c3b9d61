"""POST /classify. An adapter over api.services.classification."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from api.schemas import ClassifyBatchResponse, ClassifyRequest, ClassifyResult, ErrorResponse
from api.services.classification import ClassificationService, classification_service

router = APIRouter(tags=["classify"])
"""Included by api.routes.inference, behind the inference key."""

ERRORS = {422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}}


@router.post("/classify", response_model=ClassifyResult | ClassifyBatchResponse, responses=ERRORS)
async def classify(
    body: ClassifyRequest, service: Annotated[ClassificationService, Depends(classification_service)]
) -> ClassifyResult | ClassifyBatchResponse:
    results = await service.classify([body.text] if body.text is not None else list(body.texts or []))
    return results[0] if body.text is not None else ClassifyBatchResponse(results=results)
