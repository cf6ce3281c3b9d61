"""Every route that runs a model, on one router behind the inference key
(FLUXSERVE_API_REQUIRE_KEY_FOR_INFERENCE, api.auth.require_inference_key): a route included here
cannot forget the lock, and one not included runs no model."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.auth import require_inference_key
from api.routes import chat, classify, generate

router = APIRouter(dependencies=[Depends(require_inference_key)])
# Routes are matched in order: the high-rate one first.
router.include_router(classify.router)
router.include_router(generate.router)
router.include_router(chat.router)
