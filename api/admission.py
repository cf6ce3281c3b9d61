"""Admission control: refuse at once what the server cannot finish within a bounded wait.

Two checks, both before any work reaches Triton:

* per request (422): a /generate request larger than this deployment's maximum cost, or whose
  transformer activations would not fit the memory budget (contract.cost), is refused with the
  limit in the message: an oversized request must never reach a stub and get it OOM-killed.
* per moment (503 + Retry-After): work admitted but not finished is counted in cost units
  (megapixel-steps for /generate, images not requests; texts for /classify). A request is admitted
  while the work ahead of it fits what the server clears within `max_wait_s` at its measured
  capacity, and never less than `floor` (half a `classify` call: a batcher kept from filling its
  batches serves less than it could). Beyond that it is refused at once (api/shedding.py refuses before
  the body is read), instead of queueing into a timeout.

The capacity estimate samples completed cost over busy time (time with work in flight), so it
measures aggregate capacity under load whatever the concurrency inside Triton. It falls slowly
(hysteresis: the peak of recent estimates, halving every `capacity_half_life_s`): when refusals
take CPU from serving, the measured rate dips, and an estimate that followed the dip would refuse
more, which takes more CPU: under clients that retry at once, that loop collapsed goodput (issue 24).
Admitted work is bounded by the limit either way, so a slow fall costs at most a longer wait for a
few seconds after a real loss of capacity.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import psutil
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.triton_port import TritonPort
from api.worker_pool import share
from contract.cost import (
    MAX_CONTRACT_COST_MPS,
    TransformerShape,
    generate_cost_mps,
    instance_memory_budget,
    memory_guard_message,
    transformer_peak_bytes,
)
from contract.errors import InvalidInputError, OverloadedError
from contract.specs import (
    ATTENTION_HEADS_PARAMETER,
    CLASSIFY_LIMITS,
    FLUX_TRANSFORMER,
    GENERATE,
    HOST_MEMORY_SHARE_PARAMETER,
    TEXT_TOKENS_PARAMETER,
)

log = logging.getLogger(__name__)

MIN_SAMPLE_S = 0.05
"""Completions closer together than this are pooled into one throughput sample (no 0-division
spikes when a batch of requests finishes at once). /generate uses `generate_sample_s`: its
requests finish in batches seconds apart, and a short window read one batch's completions as a
rate several times the real one, which the slow-falling estimate then kept."""


TYPICAL_COST_SMOOTHING = 0.1
TORCH_DEVICE_PARAMETER = "torch_device"
"""common.torch_runtime.TorchRuntime.device, as the gpu-torch target renders it into a config."""


class AdmissionSettings(BaseSettings):
    """Environment prefix: FLUXSERVE_ADMISSION_."""

    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_ADMISSION_")

    generate_max_cost_mps: float | None = None
    """Largest /generate request in megapixel-steps (width*height*steps*images/1e6). None: by
    deployment: `cpu_generate_max_cost_mps` when the transformer runs on CPU, the contract's whole
    range on GPU."""
    cpu_generate_max_cost_mps: float = 16.0
    """About 512x512, 28 steps, 2 images: a minute or so of the small CPU model, far from OOM."""
    generate_memory_budget_mb: float | None = None
    """Transformer activation memory that admitted generations may use together. None: half of
    this machine's memory on a CPU deployment, no guard on GPU (TensorRT profiles bound it)."""
    generate_max_wait_s: float = 5.0
    generate_triton_slots: int | None = None
    """Triton `generate` requests (images) out at once; None: the deployed model's max_queue_size,
    so that Triton never bounces an admitted request (see DispatchGate)."""
    generate_sample_s: float = 2.0
    """Busy time pooled into one /generate throughput sample (see MIN_SAMPLE_S)."""
    generate_initial_rate_mps: float = 0.5
    """Throughput assumed until the first measurement (megapixel-steps per second)."""
    classify_max_wait_s: float = 0.08
    """Accepted /classify requests should answer within 250 ms at any load (issue 24): this bound
    on the queue ahead, plus the service time and the facade's own delay under a storm, stays below
    that (docs/decisions/admission-and-pacing.md has the figures behind the value)."""
    classify_floor_texts: float = CLASSIFY_LIMITS.max_texts_per_request // 2
    """Texts always admitted while fewer are in flight, whatever the estimate and the loop's lag:
    half a full `classify` call, which keeps Triton's classifier busy. Where the time bound admits
    fewer (a slow machine, a storm that starves Triton of CPU), the floor is what sets the queue, so
    a full call let accepted p99 run past 250 ms at 10x capacity
    (docs/decisions/admission-and-pacing.md)."""
    classify_initial_rate_texts: float = 200.0
    rate_smoothing: float = 0.3
    """Weight of the newest throughput sample in the moving average."""
    capacity_half_life_s: float = 30.0
    """How fast the capacity estimate may fall (see the module docstring)."""
    shed_refusal_budget_per_s: float = 200.0
    """Immediate retries answered per second before the rest are held (api/shedding.py: RefusalPacer)."""
    shed_max_hold_s: float = 0.5
    """Longest an immediate retry's refusal is held before it is answered; 0 answers every refusal
    at once (then clients that retry at once spin on 503s, taking the CPU that serving needs)."""
    shed_retry_window_s: float = 0.01
    """A request on a connection refused less than this long before (less the event loop's lag) is
    an immediate retry."""
    model_facts_ttl_s: float = 30.0
    """How long the deployed model's facts (target, transformer shape) are cached."""


class Entry:
    """Room held for one request that the door (api/shedding.py, in the HTTP protocol) let in, from
    then until its handler admits it (`CostQueue.admit` takes the room over) or it ends first.

    Without it, every request of a burst read in one turn of the event loop saw the same room and
    passed the door, and all but a few were then refused further in, through the ASGI stack: at 10x
    capacity more requests were refused there than were served (docs/benchmarks.md, "Under
    overload")."""

    __slots__ = ("queue", "cost", "open")

    def __init__(self, queue: CostQueue, cost: float) -> None:
        self.queue, self.cost, self.open = queue, cost, True
        queue.entering += cost

    def close(self) -> None:
        """Give the room back (once)."""
        if self.open:
            self.open = False
            self.queue.entering = max(0.0, self.queue.entering - self.cost)


ENTRY: ContextVar[Entry | None] = ContextVar("fluxserve_admission_entry", default=None)
"""The request's Entry, in the context of the task that serves it (the HTTP protocol sets it as
uvicorn creates that task); None when the request came another way (the in-process tests)."""


class CostQueue:
    """Work admitted and not yet finished, in cost units, with a capacity estimate."""

    def __init__(
        self,
        name: str,
        unit: str,
        max_wait_s: float,
        initial_rate: float,
        smoothing: float,
        floor: float = 0.0,
        half_life_s: float = 30.0,
        sample_s: float = MIN_SAMPLE_S,
    ) -> None:
        self.name, self.unit, self.max_wait_s, self.smoothing = name, unit, max_wait_s, smoothing
        self.floor, self.half_life_s, self.sample_s = floor, half_life_s, sample_s
        self.rate = initial_rate
        """Moving average of measured throughput (cost per second of busy time)."""
        self.typical_cost = 0.0
        """Moving average of admitted requests' cost: what api/shedding.py assumes of a request
        whose body it has not read."""
        self.in_flight = 0.0
        self.entering = 0.0
        """Room held for requests let in at the door and not yet admitted (`Entry`)."""
        self._peak, self._peak_at = initial_rate, time.monotonic()
        self._mark: float | None = None
        self._done_since_mark = 0.0

    def capacity(self) -> float:
        """Cost per second the server clears: the measured rate, or the recent peak decaying
        towards it when the rate dips (hysteresis)."""
        decayed = self._peak * 0.5 ** ((time.monotonic() - self._peak_at) / self.half_life_s)
        return max(self.rate, decayed)

    def limit(self, lag_s: float = 0.0) -> float:
        """Cost that may be in flight: what clears within the bound (less time the event loop is
        already late by), but never less than `floor`."""
        return max(self.floor, self.capacity() * max(0.0, self.max_wait_s - lag_s))

    def estimated_wait_s(self) -> float:
        capacity = self.capacity()
        return self.in_flight / capacity if capacity > 0 else float("inf")

    def has_room(self, cost: float, lag_s: float = 0.0) -> bool:
        """True when `cost` more may be admitted now, beside what is admitted and what is on its way
        in (always when there is neither: a lone request is served, however long it takes)."""
        ahead = self.in_flight + self.entering
        return ahead == 0 or ahead + cost <= self.limit(lag_s)

    def retry_after_s(self) -> float:
        """When the work ahead will have drained to the limit, at the estimated capacity."""
        capacity = self.capacity()
        excess = self.in_flight - self.limit()
        return max(1.0, excess / capacity) if capacity > 0 else 1.0

    def admit(self, cost: float) -> None:
        """Count `cost` in, or raise OverloadedError. The room the door held for this request, if
        any, is its own, not work ahead of it."""
        entry = ENTRY.get()
        if entry is not None and entry.queue is self:
            entry.close()
        if not self.has_room(cost):
            raise OverloadedError(
                f"{self.name} is at capacity: about {self.estimated_wait_s():.1f}s of work is ahead "
                f"(limit {self.max_wait_s:g}s); retry later",
                retry_after_s=self.retry_after_s(),
            )
        if self.in_flight == 0:
            self._mark, self._done_since_mark = time.monotonic(), 0.0
        self.in_flight += cost
        self.typical_cost += TYPICAL_COST_SMOOTHING * (cost - self.typical_cost)

    def release(self, cost: float, completed: bool) -> None:
        """Count `cost` out; completed work (not failed or cancelled) feeds the throughput estimate."""
        self.in_flight = max(0.0, self.in_flight - cost)
        now = time.monotonic()
        if completed and self._mark is not None:
            self._done_since_mark += cost
            elapsed = now - self._mark
            if elapsed >= self.sample_s:
                sample = self._done_since_mark / elapsed
                self.rate = (1 - self.smoothing) * self.rate + self.smoothing * sample
                self._mark, self._done_since_mark = now, 0.0
                if self.rate >= self.capacity():
                    self._peak, self._peak_at = self.rate, now
        if self.in_flight == 0:
            self._mark = None

    @asynccontextmanager
    async def admitted(self, cost: float) -> AsyncIterator[None]:
        self.admit(cost)
        completed = False
        try:
            yield
            completed = True
        finally:
            self.release(cost, completed)


class MemoryBudget:
    """Estimated transformer activation bytes of admitted generations, against a budget."""

    def __init__(self) -> None:
        self.in_flight = 0

    def check(self, needed: int, budget: int | None) -> None:
        if budget is None:
            return
        if needed > budget:
            raise InvalidInputError(memory_guard_message(needed, budget))
        if self.in_flight + needed > budget:
            raise OverloadedError(
                "generation memory is fully used by requests in flight; retry later", retry_after_s=2.0
            )

    @asynccontextmanager
    async def held(self, needed: int) -> AsyncIterator[None]:
        self.in_flight += needed
        try:
            yield
        finally:
            self.in_flight -= needed


class DispatchGate:
    """First in, first out: at most `capacity` Triton `generate` requests (images) out at once.

    Triton refuses what its `generate` queue cannot hold, as a 503 that costs a whole request's
    parsing, a gRPC call and Triton's own work. Admitted work beyond that waits here instead, in
    arrival order, so an admitted request is not bounced by Triton (issue 24: such bounces were
    most of the 503s of a /generate storm, each costing a parse and a gRPC call). The capacity is
    the queue's max_queue_size, not that plus the instances: Triton still counts a request for a
    moment after its response has reached us, so instances + queue still bounced requests, while
    the queue alone keeps the instances busy without (docs/decisions/admission-and-pacing.md).
    The cost queue still bounds how much waits."""

    def __init__(self) -> None:
        self.capacity: int | None = None
        """None: no bound (a queue Triton does not limit)."""
        self.out = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, n: int) -> bool:
        """`n` more slots may go out now (a request larger than the capacity goes out alone)."""
        return self.capacity is None or self.out + n <= max(self.capacity, n)

    def _grant(self) -> None:
        while self._waiting:
            n, future = self._waiting[0]
            if future.done():  # its caller went away
                self._waiting.popleft()
                continue
            if not self._fits(n):
                return
            self._waiting.popleft()
            self.out += n
            future.set_result(None)

    def resize(self, capacity: int | None) -> None:
        self.capacity = capacity
        self._grant()

    @asynccontextmanager
    async def held(self, n: int) -> AsyncIterator[None]:
        """Hold `n` slots for the block (a request larger than the capacity waits for all of it)."""
        if not self._waiting and self._fits(n):
            self.out += n
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append((n, future))
            try:
                await future
            except BaseException:
                if future.done() and not future.cancelled():
                    self.out -= n  # granted as it was cancelled: give the slots back
                    self._grant()
                raise
        try:
            yield
        finally:
            self.out -= n
            self._grant()


@dataclass(frozen=True)
class ModelFacts:
    """What the deployed `generate` model tells admission control."""

    on_gpu: bool
    shape: TransformerShape
    image_budget_bytes: int | None = None
    """What one image may use in a `generate` instance, which refuses more itself (contract.cost)."""
    triton_slots: int | None = None
    """Requests the facade sends `generate` at once (its max_queue_size); None: unbounded."""


class Admission:
    """The facade's admission control for /generate and /classify (one per app)."""

    def __init__(
        self, settings: AdmissionSettings, model_facts: Callable[[], Awaitable[ModelFacts]], workers: int = 1
    ) -> None:
        self.settings = settings
        self.workers = workers
        """Facade processes sharing the deployment (api.worker_pool): the deployment-wide bounds
        (Triton slots, the memory budget) are divided among them, and the initial rates too; each
        process measures its own capacity, which is its share."""
        self._model_facts = model_facts
        self._facts: tuple[float, ModelFacts] | None = None
        self.generate = CostQueue(
            "generation",
            "megapixel-steps",
            settings.generate_max_wait_s,
            settings.generate_initial_rate_mps / workers,
            settings.rate_smoothing,
            half_life_s=settings.capacity_half_life_s,
            sample_s=settings.generate_sample_s,
        )
        self.classify = CostQueue(
            "classification",
            "texts",
            settings.classify_max_wait_s,
            settings.classify_initial_rate_texts / workers,
            settings.rate_smoothing,
            # The floor across the processes: Triton's dynamic batcher merges their calls.
            floor=settings.classify_floor_texts / workers,
            half_life_s=settings.capacity_half_life_s,
        )
        self.memory = MemoryBudget()
        self.dispatch = DispatchGate()
        self._host_memory_bytes = psutil.virtual_memory().total

    async def facts(self) -> ModelFacts:
        if self._facts is None or time.monotonic() - self._facts[0] > self.settings.model_facts_ttl_s:
            self._facts = (time.monotonic(), await self._model_facts())
            slots = self.settings.generate_triton_slots
            slots = slots if slots is not None else self._facts[1].triton_slots
            self.dispatch.resize(None if slots is None else share(slots, self.workers))
        return self._facts[1]

    def max_cost_mps(self, facts: ModelFacts) -> float:
        if self.settings.generate_max_cost_mps is not None:
            return self.settings.generate_max_cost_mps
        return MAX_CONTRACT_COST_MPS if facts.on_gpu else self.settings.cpu_generate_max_cost_mps

    def memory_budget_bytes(self, facts: ModelFacts) -> int | None:
        if self.settings.generate_memory_budget_mb is not None:
            return int(self.settings.generate_memory_budget_mb * 2**20) // self.workers
        return None if facts.on_gpu else self._host_memory_bytes // 2 // self.workers

    @asynccontextmanager
    async def generation(self, width: int, height: int, steps: int, images: int) -> AsyncIterator[None]:
        """Admit one /generate request for the duration of the block, or raise (422 / 503)."""
        facts = await self.facts()
        cost = generate_cost_mps(width, height, steps, images)
        limit = self.max_cost_mps(facts)
        if cost > limit:
            raise InvalidInputError(
                f"this request costs {cost:,.1f} megapixel-steps (width*height*steps*num_images/1e6), over this "
                f"deployment's limit of {limit:,.1f}: use fewer steps, a smaller size or fewer num_images"
            )
        per_image = transformer_peak_bytes(width, height, 1, facts.shape)
        if facts.image_budget_bytes is not None and per_image > facts.image_budget_bytes:
            # `generate` would refuse it; saying so here gives the client the limit, not Triton's text.
            raise InvalidInputError(memory_guard_message(per_image, facts.image_budget_bytes))
        needed = transformer_peak_bytes(width, height, images, facts.shape)
        self.memory.check(needed, self.memory_budget_bytes(facts))
        async with self.generate.admitted(cost), self.memory.held(needed), self.dispatch.held(images):
            yield

    def classification(self, texts: int):
        """Admit one /classify request of `texts` texts for the duration of the block, or raise 503."""
        return self.classify.admitted(float(texts))


async def deployed_model_facts(triton: TritonPort) -> ModelFacts:
    """Read the target and transformer shape from the deployed models' configs."""
    generate = await triton.model_config(GENERATE.name)
    transformer = await triton.model_config(FLUX_TRANSFORMER)
    params = generate.get("parameters", {})

    def number(key: str, default: float) -> float:
        value = params.get(key, {}).get("string_value")
        return float(value) if value else default

    default = TransformerShape()
    shape = TransformerShape(
        int(number(ATTENTION_HEADS_PARAMETER, default.attention_heads)),
        int(number(TEXT_TOKENS_PARAMETER, default.text_tokens)),
    )
    instances = sum(int(g.get("count", 1)) for g in generate.get("instance_group", []))
    queue = int(generate.get("dynamic_batching", {}).get("default_queue_policy", {}).get("max_queue_size", 0) or 0)
    # On CPU every model runs in the python backend; on GPU the transformer is an engine, or (the
    # gpu-torch target) a python model whose runtime puts it on a CUDA device.
    device = transformer.get("parameters", {}).get(TORCH_DEVICE_PARAMETER, {}).get("string_value", "")
    return ModelFacts(
        on_gpu=transformer.get("backend") != "python" or device.startswith("cuda"),
        shape=shape,
        image_budget_bytes=instance_memory_budget(number(HOST_MEMORY_SHARE_PARAMETER, 0), instances),
        triton_slots=queue if queue > 0 else None,
    )
