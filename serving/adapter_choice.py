"""`generate`'s side of per-request adapters (issue 27): a request's `lora` resolved to what its
transformer calls carry, its prompt and what its answer says.

The pinned `flux_transformer` version serves the adapter branch when its folder holds the bank
layout (common.adapter_bank.BANK_FILE). Then every transformer call carries `adapter` (the name,
"" without one) and `adapter_scale`, so calls with and without adapters batch together. A
request naming an adapter is checked here before its loop starts: an unknown name is refused
(ValueError "no adapter named '<name>'", INVALID_ARG, which the facade turns into 404), as is an
adapter made for another base model; the adapter's trigger words lead the prompt (the rule the
facade uses for the default's, common.trigger_word), and its scale is the request's `lora_scale`
or the adapter's own default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.adapter_bank import AdapterRefused, BankLayout
from common.adapter_store import AdapterRecord, adapters_dir, read_adapter_record, version_key
from common.trigger_word import with_trigger
from contract.specs import (
    ADAPTER_OUTPUT,
    ADAPTER_SHA256_OUTPUT,
    FLUX_ADAPTER_INPUT,
    FLUX_ADAPTER_SCALE_INPUT,
    GenerateParams,
)


@dataclass(frozen=True)
class AdapterChoice:
    """What one request runs with: an adapter and its scale, or none (record None)."""

    record: AdapterRecord | None
    scale: float = 0.0

    def transformer_inputs(self) -> dict[str, np.ndarray]:
        """The adapter branch's inputs for a one-row transformer call, as sent over BLS ([1, 1]).
        The adapter is named with its version (`name@sha256`, serving.adapter_runner), so every step
        runs the weights this answer names, even if the name is published again meanwhile."""
        name = version_key(self.record.name, self.record.sha256) if self.record is not None else ""
        return {
            FLUX_ADAPTER_INPUT: np.array([[name.encode("utf-8")]], dtype=np.object_),
            FLUX_ADAPTER_SCALE_INPUT: np.array([[self.scale if self.record is not None else 0.0]], dtype=np.float32),
        }

    def output_arrays(self) -> dict[str, np.ndarray]:
        """`generate`'s optional outputs: which adapter made the image, and its LoRA file's sha256."""
        if self.record is None:
            return {}
        return {
            ADAPTER_OUTPUT: np.array([self.record.name.encode("utf-8")], dtype=np.object_),
            ADAPTER_SHA256_OUTPUT: np.array([self.record.sha256.encode("utf-8")], dtype=np.object_),
        }


NO_BRANCH = AdapterChoice(None)


class AdapterResolver:
    """Resolves requests' `lora` against the adapter store beside `repository`, for the pinned
    transformer version in `transformer_dir`."""

    def __init__(self, repository: Path, transformer_dir: Path) -> None:
        self.layout = BankLayout.load(transformer_dir) if BankLayout.exists(transformer_dir) else None
        self.root = adapters_dir(repository)

    @property
    def serves_adapters(self) -> bool:
        return self.layout is not None

    def resolve(self, req: GenerateParams) -> tuple[GenerateParams, AdapterChoice, dict[str, np.ndarray]]:
        """(the request as the loop runs it, its choice, the transformer calls' extra inputs).
        ValueError (INVALID_ARG) for an adapter this deployment cannot serve."""
        if self.layout is None:
            if req.lora is not None:
                raise AdapterRefused(
                    f"adapter {req.lora!r} cannot be served: this deployment's transformer has no adapter branch"
                )
            return req, NO_BRANCH, {}
        if req.lora is None:
            return req, NO_BRANCH, NO_BRANCH.transformer_inputs()
        record = read_adapter_record(self.root, req.lora)  # AdapterNotFound: "no adapter named '<name>'"
        base = self.layout.base_fingerprint
        if base and record.base_fingerprint != base:
            raise AdapterRefused(
                f"adapter {record.name!r} was made for another base model (fingerprint {record.base_fingerprint}) "
                f"than the served transformer's ({base})"
            )
        choice = AdapterChoice(record, record.scale if req.lora_scale is None else float(req.lora_scale))
        prompt = with_trigger(req.prompt, record.trigger_words)
        return req.model_copy(update={"prompt": prompt}), choice, choice.transformer_inputs()
