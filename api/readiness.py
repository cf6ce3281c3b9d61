"""Readiness that tells the truth, and recovery of models whose stub died.

Triton keeps reporting a python model READY after its stub process died (OOM-killed, say), while
every request to it fails. So /readyz also needs evidence that an inference works: a real
request that succeeded within `probe_interval_s`, or else a tiny probe inference (one short text;
a 64x64 one-step image), run at most once per interval per model. A real request is free
evidence, so under traffic no probe runs.

A failure naming a dead stub (contract.errors.ModelFailedError, from a real request or a probe)
marks the model not ready and reloads it through Triton's model-control API (unload + load
restarts its stubs), once at a time per model, without an operator.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from enum import StrEnum

from api.triton_port import TritonPort
from contract.errors import FluxServeError, ModelFailedError
from contract.specs import CLASSIFY, GENERATE, GENERATE_LIMITS, GenerateParams

log = logging.getLogger(__name__)

PROBE_TEXT = "readiness probe"


class NotReady(StrEnum):
    """Why /readyz answers 503: the fixed vocabulary the public body uses."""

    SHUTTING_DOWN = "shutting_down"
    """The facade is stopping."""
    TRITON_UNAVAILABLE = "triton_unavailable"
    """Triton does not answer, or is up but not ready (starting, stopping)."""
    MODEL_NOT_READY = "model_not_ready"
    """Triton does not report the model ready (loading, unloaded, unknown)."""
    MODEL_FAILED = "model_failed"
    """A stub process of the model (or of a component it calls) died; it is being reloaded."""
    PROBE_FAILED = "probe_failed"
    """Triton says ready, but no recent inference through the model succeeded."""


class Readiness:
    def __init__(self, triton: TritonPort, probe_interval_s: float = 10.0) -> None:
        # Probes are bounded by the client's own timeout and never cut short: a cold first
        # generation on a busy machine can take a minute, and a probe restarted on every
        # /readyz poll would never finish.
        self.triton, self.probe_interval_s = triton, probe_interval_s
        self._last_ok: dict[str, float] = {}
        self._failed: dict[str, str] = {}
        self._recovering: dict[str, asyncio.Task[None]] = {}
        self._probing: dict[str, asyncio.Future[bool]] = {}
        self._reported: dict[str, NotReady] | None = None

    def served(self, model: str) -> None:
        """A real request through `model` succeeded."""
        self._last_ok[model] = time.monotonic()
        self._failed.pop(model, None)

    def model_failed(self, exc: ModelFailedError) -> None:
        """A stub died: mark not ready and reload that model in the background."""
        self._failed[exc.model] = str(exc)
        self._last_ok.clear()  # a component serves several public models: re-prove them all
        if exc.model not in self._recovering:
            self._recovering[exc.model] = asyncio.get_running_loop().create_task(self._recover(exc.model))

    async def _recover(self, model: str) -> None:
        started = time.monotonic()
        log.warning("model %s failed (%s); reloading it", model, self._failed.get(model, ""))
        try:
            await self.triton.reload_model(model)
            log.warning("model %s reloaded in %.1fs", model, time.monotonic() - started)
        except FluxServeError as e:
            log.error("reloading %s failed: %s", model, e)
        finally:
            # Either way the next probe decides: still broken, and it is reloaded again.
            self._failed.pop(model, None)
            self._recovering.pop(model, None)

    async def _probe(self, model: str) -> bool:
        try:
            if model == CLASSIFY.name:
                await self.triton.classify([PROBE_TEXT])
            elif model == GENERATE.name:
                side = GENERATE_LIMITS.min_side
                await self.triton.generate(
                    GenerateParams(prompt=PROBE_TEXT, seed=0, width=side, height=side, steps=1, guidance=0.0)
                )
            else:
                return True  # no probe known: model readiness only
        except ModelFailedError as e:
            self.model_failed(e)
            return False
        except FluxServeError as e:
            log.warning("readiness probe of %s failed: %s", model, e)
            return False
        self.served(model)
        return True

    async def proven(self, model: str) -> bool:
        """A recent success through `model`, or a probe now (shared by concurrent callers)."""
        if self._failed or self._recovering:
            return False
        last = self._last_ok.get(model)
        if last is not None and time.monotonic() - last < self.probe_interval_s:
            return True
        if model not in self._probing:
            probe = asyncio.ensure_future(self._probe(model))
            self._probing[model] = probe
            probe.add_done_callback(lambda _: self._probing.pop(model, None))
        return await asyncio.shield(self._probing[model])

    async def check(self, models: Sequence[str]) -> dict[str, NotReady]:
        """{model: why it is not ready} for /readyz; empty when every model is ready. The details
        behind a reason (a stub's last words, a probe's error) are logged, not returned."""
        if not await self.triton.is_ready(()):
            return dict.fromkeys(models, NotReady.TRITON_UNAVAILABLE)
        problems: dict[str, NotReady] = {}
        failed = set(self._failed) | set(self._recovering)
        for model in models:
            # A failed component (not itself a required model) may serve any of them.
            if model in failed or failed - set(models):
                problems[model] = NotReady.MODEL_FAILED
            elif not await self.triton.is_ready((model,)):
                problems[model] = NotReady.MODEL_NOT_READY
        for model in models:
            if not problems and not await self.proven(model):
                problems[model] = NotReady.PROBE_FAILED
        return problems

    def report(self, problems: Mapping[str, NotReady]) -> None:
        """Log readiness when it changes (/readyz is polled every few seconds)."""
        if problems == self._reported:
            return
        self._reported = dict(problems)
        if not problems:
            log.info("ready")
            return
        failed = f" (failed: {self._failed})" if self._failed else ""
        log.warning("not ready: %s%s", {m: str(why) for m, why in problems.items()}, failed)
