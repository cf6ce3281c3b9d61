"""Generation: /generate (JSON, raw bytes, SSE) and /chat's image, through one path.

`GenerationService.stream` is the one path: admission (api.admission: 422 over the deployment's
cost or memory limit, 503 when the work ahead would not clear in time, then a place in the
dispatch gate), the trigger-word prompt (looked up only once admitted: a refused request costs
nothing more than the refusal), each image's GenerateParams, the images run concurrently so they
share transformer steps in Triton, with one fate (api.cancellation: all cancelled when one fails,
the client leaves, the deadline passes or the server stops), readiness evidence, the items metric
and the encoding off the event loop. It yields `Progress` events and then one `Done`; failures are
raised as contract.errors exceptions, which api.errors maps for JSON and SSE alike.

A request that names an adapter (`lora`) has it looked up in the adapter store first, before
admission and before any Triton call: an unknown name is an UnknownAdapterError (404 naming it);
a known one leads the prompt with its trigger words instead of the default LoRA's, and the answer
says which adapter (and its hash) made the images.

With `progress=False` the images run on `generate` (one gRPC call each) and no Progress comes:
`run`, the unary answer, is the fold of that stream, so the two answers cannot drift apart (TGI's
`generate()` = fold of `generate_stream()`). With progress they run on `generate_stream`.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request

from api.cancellation import Gone, guarded, merged
from api.media import encode_image
from api.model_parameter import VersionedParameter
from api.schemas import AppliedLora, GenerateOptions, GenerateRequest, GenerateResponse
from api.state import AppState
from common.adapter_store import AdapterNotFound, AdapterRecord, AdapterStoreError, adapters_dir, read_adapter_record
from common.trigger_word import with_trigger
from contract.codec import GenerateProgress, GenerateResult
from contract.errors import InferenceError, InvalidInputError, ModelFailedError, UnknownAdapterError
from contract.specs import GENERATE, GENERATE_STREAM, TRIGGER_PARAMETER, GenerateParams, random_seed


@dataclass(frozen=True)
class Progress:
    """Image `image` (0-based) finished denoising step `step` of `total`; `fraction` is the whole
    request's progress in [0, 1]."""

    image: int
    step: int
    total: int
    elapsed_s: float
    fraction: float


@dataclass(frozen=True)
class Done:
    """The answer: the encoded images (seeds seed, seed + 1, ...) and what produced them."""

    images: tuple[bytes, ...]
    seed: int
    model_version: str
    prompt: str
    """As sent to the model (trigger words added when configured)."""
    output_format: str
    timings: dict[str, float]
    lora: AppliedLora | None = None

    def response(self) -> GenerateResponse:
        """The JSON answer of /generate (images base64-encoded)."""
        return GenerateResponse(
            images=[base64.b64encode(b).decode() for b in self.images],
            seed=self.seed,
            model_version=self.model_version,
            prompt=self.prompt,
            output_format=self.output_format,
            timings=self.timings,
            lora=self.lora,
        )


GenerationEvent = Progress | Done


@dataclass(frozen=True)
class _Step:
    index: int
    progress: GenerateProgress


@dataclass(frozen=True)
class _Image:
    index: int
    result: GenerateResult


class GenerationService:
    """One per app (api.app.create_app); reads the state's parts at call time, as the lifespan
    opens them."""

    def __init__(self, state: AppState) -> None:
        self._state = state
        self._triggers = VersionedParameter(GENERATE.name, TRIGGER_PARAMETER)

    async def run(self, body: GenerateRequest, gone: Gone | None = None) -> Done:
        """The unary answer: the fold of `stream(body, progress=False)`."""
        done: Done | None = None
        async for event in self.stream(body, progress=False, gone=gone):
            if isinstance(event, Done):
                done = event
        if done is None:  # stream either yields a Done or raises: belt and braces
            raise InferenceError("the generation ended without an answer")
        return done

    def stream(
        self, body: GenerateRequest, *, progress: bool = True, gone: Gone | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """`Progress` events (when `progress`), then one `Done`; or a raised contract.errors
        exception. `gone` returns when the client has left (api.cancellation.Gone)."""
        settings = self._state.settings
        return guarded(self._generation(body, progress), settings.generate_timeout_s, self._state.stopping, gone)

    async def _generation(self, body: GenerateRequest, progress: bool) -> AsyncGenerator[GenerationEvent, None]:
        state = self._state
        started = time.perf_counter()
        seed = body.seed if body.seed is not None else random_seed()
        adapter = await self.adapter(body)
        results: list[GenerateResult] = []
        try:
            async with state.admission.generation(body.width, body.height, body.steps, body.num_images):
                prompt = await self.prompt(body.prompt, adapter)
                images = body.image_params(prompt, seed)
                # Closed with this generator, not when the garbage collector gets to it: closing
                # it cancels the images in Triton.
                async with aclosing(self._images(images, progress)) as events:
                    async for event in events:
                        if isinstance(event, Progress):
                            yield event
                        else:
                            results = event
        except ModelFailedError as e:  # a dead stub: readiness reports it and reloads the model
            state.readiness.model_failed(e)
            raise
        infer_s = time.perf_counter() - started
        state.readiness.served(GENERATE_STREAM.name if progress else GENERATE.name)
        state.metrics.items.labels("generate").inc(len(results))
        # PNG/JPEG encoding of large images takes tens of ms of CPU: keep it off the event loop.
        fmt = body.output_format
        encoded = await asyncio.to_thread(lambda: tuple(encode_image(r.image, fmt) for r in results))
        timings = {"inference_s": round(infer_s, 4), "total_s": round(time.perf_counter() - started, 4)}
        lora = applied_lora(body, adapter, results[0])
        yield Done(encoded, seed, results[0].model_version, prompt, fmt, timings, lora)

    async def _images(
        self, images: list[GenerateParams], progress: bool
    ) -> AsyncGenerator[Progress | list[GenerateResult], None]:
        """All images at once (they share transformer steps in Triton) with one fate: Progress
        events as their steps finish, then the results in image order."""
        results: dict[int, GenerateResult] = {}
        done_steps = [0] * len(images)
        total_steps = sum(p.steps for p in images)
        async with aclosing(merged(*(self._image(i, p, progress) for i, p in enumerate(images)))) as items:
            async for item in items:
                if isinstance(item, _Image):
                    results[item.index] = item.result
                    continue
                done_steps[item.index] = item.progress.step
                yield Progress(
                    image=item.index,
                    step=item.progress.step,
                    total=item.progress.total,
                    elapsed_s=round(item.progress.elapsed_s, 4),
                    fraction=round(sum(done_steps) / total_steps, 4),
                )
        yield [results[i] for i in range(len(images))]

    async def _image(self, index: int, params: GenerateParams, progress: bool) -> AsyncIterator[_Step | _Image]:
        triton = self._state.triton_generate
        if not progress:
            yield _Image(index, await triton.generate(params))
            return
        result: GenerateResult | None = None
        async for step, last in triton.generate_stream(params):
            if last is not None:  # the final response repeats the last step: no second event
                result = last
            else:
                yield _Step(index, step)
        if result is None:  # the client raises first; belt and braces
            raise InferenceError(f"{GENERATE_STREAM.name} ended without an image")
        yield _Image(index, result)

    async def adapter(self, options: GenerateOptions | None) -> AdapterRecord | None:
        """The published adapter `options` names (None when it names none); UnknownAdapterError
        (404) when there is no such adapter. One small file read, off the event loop."""
        name = options.lora if options is not None else None
        if name is None:
            return None
        root = adapters_dir(self._state.job_settings.model_repository)
        try:
            return await asyncio.to_thread(read_adapter_record, root, name)
        except AdapterNotFound:
            raise UnknownAdapterError(name) from None
        except AdapterStoreError as e:  # a bad name, or a record this server cannot read: the caller's 422
            raise InvalidInputError(str(e)) from None

    async def prompt(self, prompt: str, adapter: AdapterRecord | None = None) -> str:
        """The prompt sent to `generate`: led by the trigger words of the adapter it names, else
        of the serving LoRA (when enabled), unless it has them already, by the rule training
        applied to its captions. An adapter was trained on captions led by its own words only, and
        `generate` leads a prompt with them whatever this facade's setting (serving.adapter_choice):
        added here too, so the answer's `prompt` is what the model saw."""
        if adapter is not None:
            return with_trigger(prompt, adapter.trigger_words)
        if not self._state.settings.add_trigger_word:
            return prompt
        return with_trigger(prompt, await self.trigger_word())

    async def trigger_word(self) -> str:
        """The trigger words of the LoRA in the newest ready `generate` version (the one a request
        sent now runs on), else the configured default."""
        triton = self._state.triton
        version = await triton.newest_ready_version(GENERATE.name)
        value = await self._triggers.get(triton, version) if version else None
        return value or self._state.settings.trigger_word


def applied_lora(body: GenerateOptions, adapter: AdapterRecord | None, result: GenerateResult) -> AppliedLora | None:
    """What the answer says of the adapter: what the model reports it ran (an adapter deleted and
    published again under the same name since the lookup has another hash), else the record looked
    up for this request; with the scale applied (the request's, else the adapter's default)."""
    if adapter is None:
        return None
    scale = body.lora_scale if body.lora_scale is not None else adapter.scale
    return AppliedLora(name=result.lora or adapter.name, sha256=result.lora_sha256 or adapter.sha256, scale=scale)


async def generation_service(request: Request) -> GenerationService:
    """FastAPI dependency (a coroutine: see api.state.get_state)."""
    return request.app.state.generation
