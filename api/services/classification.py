"""Classification: /classify and /chat's first step, through one path.

Admission (api.admission: refused with 503 when the work ahead would not clear in time), the
shared Triton calls (api.classify_batcher, when configured), readiness evidence (a success proves
`classify`; a dead stub is reported and reloaded), the items metric, and the `uncertain` flag from
the threshold that the answering version was published with.
"""

from __future__ import annotations

from fastapi import Request

from api.model_parameter import VersionedParameter
from api.schemas import ClassifyResult
from api.state import AppState
from client.triton_client import ClassifyResult as TritonClassifyResult
from contract.errors import ModelFailedError
from contract.specs import CLASSIFY, THRESHOLD_PARAMETER

DEFAULT_THRESHOLD = 0.5
"""Uncertainty threshold for a classifier published without one."""


class ClassificationService:
    """One per app (api.app.create_app); reads the state's parts at call time, as the lifespan
    opens them."""

    def __init__(self, state: AppState) -> None:
        self._state = state
        self._thresholds = VersionedParameter(CLASSIFY.name, THRESHOLD_PARAMETER)

    async def classify(self, texts: list[str]) -> list[ClassifyResult]:
        """One result per text, in order; raises contract.errors (api.errors maps them)."""
        state = self._state
        try:
            async with state.admission.classification(len(texts)):
                results = await self._call(texts)
        except ModelFailedError as e:  # a dead stub: readiness reports it and reloads the model
            state.readiness.model_failed(e)
            raise
        state.readiness.served(CLASSIFY.name)
        threshold = await self.threshold(results[0].model_version)
        state.metrics.items.labels("classify").inc(len(results))
        return [
            ClassifyResult(label=r.label, score=r.score, scores=r.scores, uncertain=r.score < threshold)
            for r in results
        ]

    async def _call(self, texts: list[str]) -> list[TritonClassifyResult]:
        """Through Triton, sharing calls with concurrent requests when configured."""
        batcher = self._state.classify_batcher
        if batcher is not None:
            return await batcher.classify(texts)
        return await self._state.triton.classify(texts)

    async def threshold(self, version: str) -> float:
        """The override from settings, else what `classify` version `version` was published with."""
        if self._state.settings.classify_threshold is not None:
            return self._state.settings.classify_threshold
        value = await self._thresholds.get(self._state.triton, version)
        return float(value) if value else DEFAULT_THRESHOLD


async def classification_service(request: Request) -> ClassificationService:
    """FastAPI dependency (a coroutine: see api.state.get_state)."""
    return request.app.state.classification
