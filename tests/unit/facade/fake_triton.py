"""A fake Triton client for the in-process facade tests: it satisfies api.triton_port.TritonPort,
so `create_app(settings, triton=lambda url, timeout_s: fake)` serves every route against it.

It answers at once unless a test holds a kind of call (`hold("generate")`): held calls wait on an
event the test sets (`release`), and `wait_entered` waits for calls to arrive, so latency and
concurrency are conditions the test waits on, never sleeps. Failures are set per kind of call
(`classify_error`, `generate_error`: a factory of the exception, as client.triton_client raises
it); every call is counted (`calls`) and what the facade asked for is recorded (`classified`,
`generated`), so "refused before any model ran" is observed, not inferred.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict
from tritonclient.utils import InferenceServerException

from api.triton_port import TritonPort
from contract.codec import ClassifyResult, GenerateProgress, GenerateResult
from contract.errors import translate
from contract.specs import CLASSIFY, FLUX_TRANSFORMER, GENERATE, IMAGE_REQUEST, LABELS, GenerateParams

CONVERSATION = next(label for label in LABELS if label != IMAGE_REQUEST)
SCORE = 0.99
"""The fake classifier's confidence in the label it picks (below 1, so a threshold above it makes
every answer uncertain)."""


def triton_error(message: str, status: str | None = None) -> Exception:
    """What client.triton_client raises for a tritonclient exception (`translate(e) from e`)."""
    cause = InferenceServerException(msg=message, status=status)
    try:
        raise translate(cause) from cause
    except Exception as e:  # noqa: BLE001  (returned with its __cause__ set, as raised)
        return e


def seed_image(params: GenerateParams) -> np.ndarray:
    """The fake's picture for a request: its size, one grey level drawn from its seed (so images of
    different seeds differ, and a test can tell which seed an image came from)."""
    return np.full((params.height, params.width, 3), seed_level(params.seed), np.uint8)


def seed_level(seed: int) -> int:
    return (seed * 37 + 11) % 256


def served_configs(repo: Path) -> dict[str, dict]:
    """The configs of `generate` and the transformer as Triton reports them (the JSON of the
    config protobuf), read from a built model repository: the facade's admission reads its model
    facts (shape, memory share, instances, queue) from these. Skips when the repository is not
    built (`make models`; `make test` builds it first)."""
    from export.triton_config import parse_config

    configs = {}
    for model in (GENERATE.name, FLUX_TRANSFORMER):
        path = repo / model / "config.pbtxt"
        if not path.exists():
            pytest.skip(f"{path} is not built: run `make models` (make test does it)")
        configs[model] = MessageToDict(parse_config(path.read_text()), preserving_proto_field_name=True)
    return configs


class FakeTriton(TritonPort):
    def __init__(self, configs: dict[str, dict] | None = None, version: str = "1") -> None:
        self.server_ready = True
        self.not_ready: set[str] = set()
        self.label: Callable[[str], str] = lambda text: IMAGE_REQUEST
        """The label the fake classifier gives a text."""
        self.classify_error: Callable[[], Exception] | None = None
        self.generate_error: Callable[[], Exception] | None = None
        self.configs: dict[str, dict] = configs if configs is not None else {}
        self.version = version
        self.adapters: dict[str, str] = {}
        """The adapters the fake `generate` serves: name -> the sha256 it reports. A request naming
        another is refused as Triton refuses it (INVALID_ARG: no adapter named ...)."""
        self.calls: Counter[str] = Counter()
        self.classified: list[list[str]] = []
        self.generated: list[GenerateParams] = []
        self.reloading = asyncio.Event()  # set when a reload starts; the reload waits for `reloaded`
        self.reloaded = asyncio.Event()
        self._gates: dict[str, asyncio.Event] = {}
        self._entered: Counter[str] = Counter()
        self._arrivals = asyncio.Condition()

    # ------------------------------------------------------------------ what a test steers

    def hold(self, kind: str) -> None:
        """From now on, calls of `kind` ("classify", "generate") wait until `release(kind)`."""
        self._gates[kind] = asyncio.Event()

    def release(self, kind: str) -> None:
        gate = self._gates.pop(kind, None)
        if gate is not None:
            gate.set()

    def entered(self, kind: str) -> int:
        """Calls of `kind` that have arrived so far (held or answered)."""
        return self._entered[kind]

    async def wait_entered(self, kind: str, count: int, timeout_s: float = 10.0) -> None:
        """Until `count` calls of `kind` have arrived (held or answered)."""
        async with asyncio.timeout(timeout_s), self._arrivals:
            await self._arrivals.wait_for(lambda: self._entered[kind] >= count)

    async def _enter(self, kind: str, method: str) -> None:
        self.calls[method] += 1
        async with self._arrivals:
            self._entered[kind] += 1
            self._arrivals.notify_all()
        gate = self._gates.get(kind)
        if gate is not None:
            await gate.wait()

    # ------------------------------------------------------------------ TritonPort

    async def is_ready(self, models: Sequence[str] = (CLASSIFY.name,)) -> bool:
        self.calls["is_ready"] += 1
        return self.server_ready and not set(models) & self.not_ready

    async def classify(self, texts: list[str]) -> list[ClassifyResult]:
        await self._enter("classify", "classify")
        self.classified.append(list(texts))
        if self.classify_error is not None:
            raise self.classify_error()
        results = []
        for text in texts:
            label = self.label(text)
            other = next(x for x in LABELS if x != label)
            results.append(ClassifyResult(label, SCORE, {label: SCORE, other: 1 - SCORE}, self.version))
        return results

    async def model_config(self, model: str, version: str = "") -> dict:
        self.calls["model_config"] += 1
        return self.configs.get(model, {"backend": "python"})

    async def model_parameter(self, model: str, key: str, version: str = "") -> str | None:
        config = await self.model_config(model, version)
        return config.get("parameters", {}).get(key, {}).get("string_value")

    async def newest_ready_version(self, model: str) -> str | None:
        return self.version

    async def reload_model(self, model: str, timeout_s: float = 300.0) -> None:
        self.calls["reload_model"] += 1
        self.reloading.set()
        await self.reloaded.wait()

    def _result(self, params: GenerateParams) -> GenerateResult:
        if params.lora is None:
            return GenerateResult(seed_image(params), params.seed, self.version)
        if params.lora not in self.adapters:
            raise triton_error(f"generate: no adapter named {params.lora!r}", "StatusCode.INVALID_ARGUMENT")
        return GenerateResult(seed_image(params), params.seed, self.version, params.lora, self.adapters[params.lora])

    async def generate(self, params: GenerateParams) -> GenerateResult:
        await self._enter("generate", "generate")
        self.generated.append(params)
        if self.generate_error is not None:
            raise self.generate_error()
        return self._result(params)

    async def generate_stream(
        self, params: GenerateParams
    ) -> AsyncIterator[tuple[GenerateProgress, GenerateResult | None]]:
        """As Triton's decoupled model answers: a response after each step, then the image with
        the last step repeated (a failure set for `generate` comes after the first step)."""
        await self._enter("generate", "generate_stream")
        self.generated.append(params)
        for step in range(1, params.steps + 1):
            yield GenerateProgress(step, params.steps, 0.01 * step), None
            if self.generate_error is not None:
                raise self.generate_error()
        last = GenerateProgress(params.steps, params.steps, 0.01 * params.steps)
        yield last, self._result(params)

    async def close(self) -> None:
        pass


def fake_factory(fake: FakeTriton) -> Callable[[str, float], Any]:
    """For create_app(triton=...): every client the app opens is this one fake."""
    return lambda url, timeout_s: fake
