"""Reading and validating a `generate` request's tensors (plain numpy, unit-testable)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from contract.codec import check_generate
from contract.errors import InvalidInputError
from contract.specs import GenerateDefaults
from serving.flux_loop import GenerationRequest


def _scalar(value: np.ndarray | None, default, cast):
    if value is None or value.size == 0:
        return default
    item = value.reshape(-1)[0]
    return cast(item.decode("utf-8") if isinstance(item, bytes) else item)


def read_request(get: Callable[[str], np.ndarray | None], defaults: GenerateDefaults) -> GenerationRequest:
    """Build a GenerationRequest from tensors (`get(name)` -> array or None); ValueError if bad."""
    prompt = _scalar(get("prompt"), "", str)
    seed = _scalar(get("seed"), 0, int)
    width = _scalar(get("width"), defaults.width, int)
    height = _scalar(get("height"), defaults.height, int)
    steps = _scalar(get("steps"), defaults.steps, int)
    guidance = _scalar(get("guidance"), defaults.guidance, float)
    try:
        check_generate(prompt, width, height, steps, guidance)
    except InvalidInputError as e:
        raise ValueError(str(e)) from e
    if seed < 0:
        raise ValueError("seed must be >= 0")
    return GenerationRequest(prompt=prompt, width=width, height=height, steps=steps, guidance=guidance, seed=seed)
