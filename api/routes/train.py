"""POST /train (multipart) -> 202 job id; GET /train, GET /train/{id}, DELETE /train/{id},
GET /train/{id}/events (server-sent progress events).

The upload is validated (zip safety, images, trigger word, settings) before anything is queued,
so a bad dataset is a 4xx with a message and never a failed job.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse

from api.errors import envelope
from api.state import AppState, get_state
from training.jobs import TERMINAL, JobSettings, job_dir
from training.lora_dataset import DatasetError, save_prepared, validate_and_extract
from training.lora_settings import LoraTrainSettings

router = APIRouter(tags=["train"])
CHUNK = 1 << 20


def _validation_message(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())


async def _save_upload(upload: UploadFile, dest, limit: int) -> int:
    size = 0
    with dest.open("wb") as fh:
        while chunk := await upload.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise OverflowError(f"upload larger than {limit} bytes")
            fh.write(chunk)
    return size


@router.post("/train", status_code=202)
async def create_job(
    state: Annotated[AppState, Depends(get_state)],
    dataset: Annotated[UploadFile | None, File(description="zip of png/jpeg/webp images with optional same-name .txt captions")] = None,
    trigger_word: Annotated[str | None, Form()] = None,
    kind: Annotated[str, Form(description="flux_lora (default) or classifier")] = "flux_lora",
    steps: Annotated[int | None, Form()] = None,
    rank: Annotated[int | None, Form()] = None,
    learning_rate: Annotated[float | None, Form()] = None,
    resolution: Annotated[int | None, Form()] = None,
    seed: Annotated[int | None, Form()] = None,
    batch_size: Annotated[int | None, Form()] = None,
    publish: Annotated[bool, Form(description="re-export and serve the result when training succeeds")] = True,
) -> JSONResponse:
    settings: JobSettings = state.job_settings
    if kind not in ("flux_lora", "classifier"):
        return envelope(422, "invalid_request", "kind must be 'flux_lora' or 'classifier'")
    if kind == "classifier":
        overrides = {k: v for k, v in {"epochs": steps, "learning_rate": learning_rate, "seed": seed, "batch_size": batch_size}.items() if v is not None}
        job = state.jobs.create("classifier", {"train": overrides, "publish": publish})
        state.enqueue(job.id)
        return JSONResponse(status_code=202, content={"job_id": job.id, "status": job.status})

    if dataset is None:
        return envelope(422, "invalid_request", "dataset: a zip file is required for flux_lora jobs")
    if trigger_word is None:
        return envelope(422, "invalid_request", "trigger_word: field required")
    fields = {"steps": steps, "rank": rank, "learning_rate": learning_rate, "resolution": resolution, "seed": seed, "batch_size": batch_size}
    try:
        train = LoraTrainSettings(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        return envelope(422, "invalid_request", _validation_message(e))

    job = state.jobs.create("flux_lora", {}, job_id=None)
    folder = job_dir(settings, job.id)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        await _save_upload(dataset, folder / "upload.zip", settings.max_upload_bytes)
        prepared = await run_in_threadpool(validate_and_extract, folder / "upload.zip", folder / "dataset", trigger_word)
        await run_in_threadpool(save_prepared, prepared)
    except (DatasetError, OverflowError) as e:
        state.jobs.delete(job.id)
        shutil.rmtree(folder, ignore_errors=True)
        status = getattr(e, "http_status", 413)
        return envelope(status, "invalid_dataset", str(e))
    except BaseException:
        state.jobs.delete(job.id)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    (folder / "upload.zip").unlink(missing_ok=True)
    params: dict[str, Any] = {
        "train": train.model_dump(), "trigger_word": prepared.trigger_word, "publish": publish,
        "dataset": {"images": prepared.count, "sha256": prepared.sha256},
    }
    state.jobs.update(job.id, params=params)
    state.enqueue(job.id)
    return JSONResponse(status_code=202, content={"job_id": job.id, "status": "queued"})


@router.get("/train")
async def list_jobs(state: Annotated[AppState, Depends(get_state)], limit: int = 100) -> dict[str, list[dict]]:
    return {"jobs": [j.public() for j in state.jobs.list(limit)]}


@router.get("/train/{job_id}")
async def get_job(job_id: str, state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    job = state.jobs.get(job_id)
    if job is None:
        return envelope(404, "not_found", f"no job {job_id}")
    return JSONResponse(job.public())


@router.delete("/train/{job_id}")
async def cancel_job(job_id: str, state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    store = state.jobs
    job = store.get(job_id)
    if job is None:
        return envelope(404, "not_found", f"no job {job_id}")
    if job.status in TERMINAL:
        return envelope(409, "conflict", f"job {job_id} already {job.status}")
    job = store.cancel(job_id)
    return JSONResponse(job.public())


@router.get("/train/{job_id}/events")
async def job_events(job_id: str, request: Request, state: Annotated[AppState, Depends(get_state)], poll_s: float = 0.5):
    store = state.jobs
    if store.get(job_id) is None:
        return envelope(404, "not_found", f"no job {job_id}")

    async def stream():
        last = None
        while True:
            if await request.is_disconnected():
                return
            job = await run_in_threadpool(store.get, job_id)
            if job is None:
                return
            if job.updated_unix != last:
                last = job.updated_unix
                yield {"event": "status" if job.status in TERMINAL else "progress", "data": json.dumps(job.public())}
            if job.status in TERMINAL:
                return
            await asyncio.sleep(poll_s)

    return EventSourceResponse(stream())
