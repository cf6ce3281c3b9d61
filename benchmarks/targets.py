"""The things load is driven against: one class per (door, model).

Every request validates what came back (a known label, an image of the requested size), so a
server that answers fast with garbage counts as erroring, not as fast.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from typing import Protocol

import aiohttp

from benchmarks.fast_http import FastHttpPool
from benchmarks.workload import GENERATE_PROMPTS, GenerateWorkload
from client.triton_client import AsyncTritonClient
from contract.specs import CLASSIFY, GENERATE, LABELS, GenerateParams

# Target names as the CLI spells them: <door>-<model>, plus the in-process ORT limit.
FACADE, TRITON, BASELINE = "facade", "triton", "baseline"
DOORS: tuple[str, ...] = (FACADE, TRITON, BASELINE)
MODELS: tuple[str, ...] = (CLASSIFY.name, GENERATE.name)
ORT_INPROCESS = "ort-inprocess"
ALL_TARGETS: tuple[str, ...] = (
    *(f"{door}-{CLASSIFY.name}" for door in DOORS),
    ORT_INPROCESS,
    *(f"{door}-{GENERATE.name}" for door in DOORS),
)


class BadResponse(RuntimeError):
    """The server answered, but not with what the contract promises."""


class Target(Protocol):
    async def __call__(self, i: int) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class TargetName:
    door: str
    model: str

    @classmethod
    def parse(cls, name: str) -> TargetName:
        door, _, model = name.partition("-")
        if door not in DOORS or model not in MODELS:
            raise ValueError(f"unknown target {name!r}; known: {', '.join(ALL_TARGETS)}")
        return cls(door, model)

    def __str__(self) -> str:
        return f"{self.door}-{self.model}"


def _http_client(base_url: str, pool: int, timeout_s: float) -> aiohttp.ClientSession:
    """One session, one pool: as many keep-alive connections as concurrent requests, so no request
    waits for a connection and none is re-opened during the run.

    aiohttp rather than httpx: the load generator shares the 2 cores with what it measures, and
    httpx's async client costs many times aiohttp's CPU per request (docs/benchmarks.md,
    "Measurements behind smaller choices").
    Must be called inside the running event loop.
    """
    return aiohttp.ClientSession(
        base_url=base_url,
        connector=aiohttp.TCPConnector(limit=pool, limit_per_host=pool),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    )


async def _post_json(client: aiohttp.ClientSession, path: str, body: dict) -> dict:
    async with client.post(path, json=body) as r:
        if r.status != 200:
            raise BadResponse(f"HTTP {r.status}: {(await r.text())[:200]}")
        return await r.json()


def _check_classify_body(body: dict) -> None:
    if body.get("label") not in LABELS or set(body.get("scores", {})) != set(LABELS):
        raise BadResponse(f"unexpected classify body: {str(body)[:200]}")


class HttpClassify:
    """POST /classify {"text"} on the facade or the baseline (same public contract).

    Sent with benchmarks.fast_http rather than aiohttp: /classify runs at hundreds of requests per
    second on the same 2 cores as the servers, and aiohttp's Python per request was the load
    generator taking CPU from what it measures (docs/benchmarks.md, "Measurements behind smaller
    choices"). Each request is built once
    per message; the response is parsed by httptools and checked like any client would.
    """

    def __init__(self, base_url: str, texts: list[str], pool: int, timeout_s: float = 30.0) -> None:
        self.pool = FastHttpPool.for_url(base_url, max_connections=pool)
        self.requests = [self.pool.post_bytes("/classify", json.dumps({"text": t}).encode()) for t in texts]
        self.timeout_s = timeout_s

    async def __call__(self, i: int) -> None:
        r = await self.pool.request(self.requests[i % len(self.requests)], self.timeout_s)
        if r.status != 200:
            raise BadResponse(f"HTTP {r.status}: {r.body[:200]!r}")
        _check_classify_body(json.loads(r.body))

    async def aclose(self) -> None:
        await self.pool.close()


class GrpcClassify:
    """`classify` straight on Triton over gRPC (tritonclient.grpc.aio through client/)."""

    def __init__(self, grpc_url: str, texts: list[str], timeout_s: float = 30.0) -> None:
        self.texts = texts
        self.client = AsyncTritonClient(grpc_url, timeout_s)

    async def __call__(self, i: int) -> None:
        (result,) = await self.client.classify([self.texts[i % len(self.texts)]])
        if result.label not in LABELS:
            raise BadResponse(f"unexpected label {result.label!r}")

    async def aclose(self) -> None:
        await self.client.close()


class HttpGenerate:
    """POST /generate on the facade or the baseline; expects one base64 PNG."""

    def __init__(self, base_url: str, params: GenerateWorkload, pool: int, timeout_s: float = 600.0) -> None:
        self.params = params
        self.client = _http_client(base_url, pool, timeout_s)

    async def __call__(self, i: int) -> None:
        p = self.params
        body = {
            "prompt": GENERATE_PROMPTS[i % len(GENERATE_PROMPTS)],
            "width": p.width,
            "height": p.height,
            "steps": p.steps,
            "guidance": p.guidance,
            "seed": i,
            "num_images": 1,
            "output_format": "png",
        }
        images = (await _post_json(self.client, "/generate", body)).get("images") or []
        if len(images) != 1 or not base64.b64decode(images[0]).startswith(b"\x89PNG"):
            raise BadResponse("expected one base64 PNG image")

    async def aclose(self) -> None:
        await self.client.close()


class GrpcGenerate:
    def __init__(self, grpc_url: str, params: GenerateWorkload, timeout_s: float = 600.0) -> None:
        self.params = params
        self.client = AsyncTritonClient(grpc_url, timeout_s)

    async def __call__(self, i: int) -> None:
        p = self.params
        prompt = GENERATE_PROMPTS[i % len(GENERATE_PROMPTS)]
        result = await self.client.generate(GenerateParams(prompt=prompt, seed=i, **asdict(p)))
        if tuple(result.image.shape) != (p.height, p.width, 3):
            raise BadResponse(f"image shape {result.image.shape}, expected {(p.height, p.width, 3)}")

    async def aclose(self) -> None:
        await self.client.close()


def make_target(name: TargetName, url: str, texts: list[str], params: GenerateWorkload, pool: int) -> Target:
    """`url` is an HTTP base URL for the facade/baseline, a host:port for Triton gRPC."""
    if name.model == CLASSIFY.name:
        return GrpcClassify(url, texts) if name.door == TRITON else HttpClassify(url, texts, pool)
    return GrpcGenerate(url, params) if name.door == TRITON else HttpGenerate(url, params, pool)
