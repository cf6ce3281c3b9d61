"""POST /train (multipart) -> 202 job id; GET /train, GET /train/{id}, DELETE /train/{id},
GET /train/{id}/events (server-sent progress events). Every route needs the operator key
(api.auth); the key's name is recorded as the job's owner.

`publish` is `true` (the default: a new model version serves the LoRA), `false`, or `adapter`: the
LoRA becomes the adapter `name` (default: the job id) that requests choose by name, and no model
version changes. A name that is taken (published, or claimed by an unfinished job) is a 409 before
anything is queued; a classifier job cannot be published as an adapter (422).

The upload streams straight into the job's folder with the upload limit enforced as it arrives
(api.upload), and is validated (zip safety, images, trigger word, settings) before anything is
queued: a bad dataset is a 4xx with a message, never a failed job, and leaves nothing behind. An
upload that could not be taken now (no worker, queue full, low disk, too many uploads at once) is
refused before its body is read (api.upload_gate).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, TypeAdapter, ValidationError
from sse_starlette.sse import EventSourceResponse

from api.auth import require_operator
from api.errors import envelope
from api.job_liveness import refuse_new_job
from api.job_view import public_job
from api.schemas import ErrorResponse
from api.state import AppState, get_state
from api.upload import UploadError, receive_multipart
from api.upload_gate import refuse_upload, uploads_busy
from common.adapter_bank import AdapterRefused
from common.adapter_store import InvalidAdapterName, adapter_exists, adapters_dir, check_name
from contract.specs import DEFAULT_JOB_KIND, JOB_KINDS, TRAIN_LIMITS
from publish.adapters import served_bank_layout
from training.classifier_params import ClassifierJobParams
from training.jobs import ADAPTER_NAME_PARAM, PUBLISH_ADAPTER, TERMINAL, JobSettings, JobStore, PublishMode, job_dir
from training.lora_dataset import DatasetError, DatasetLimits, save_prepared, validate_and_extract
from training.lora_settings import LoraTrainSettings

router = APIRouter(tags=["train"], dependencies=[Depends(require_operator)])
ERRORS = {401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}
JobId = Annotated[str, PathParam(max_length=64)]
UPLOAD_FIELD = "dataset"
FORM_FIELDS = frozenset(
    {"trigger_word", "kind", "steps", "rank", "learning_rate", "resolution", "seed", "batch_size", "publish", "name"}
)
_BOOL = TypeAdapter(bool)

# The multipart body is parsed by api.upload rather than by FastAPI (which would spool the file to
# a temp file first), so its schema is declared here for /docs and clients.
_FORM_SCHEMA = {
    "type": "object",
    "properties": {
        UPLOAD_FIELD: {
            "type": "string",
            "format": "binary",
            "description": "zip of png/jpeg/webp images with optional same-name .txt captions (flux_lora)",
        },
        "kind": {"type": "string", "enum": list(JOB_KINDS), "default": DEFAULT_JOB_KIND},
        "trigger_word": {"type": "string", "maxLength": 100},
        "steps": {"type": "integer", "description": "LoRA training steps; for kind=classifier: epochs"},
        "rank": {"type": "integer"},
        "learning_rate": {"type": "number"},
        "resolution": {"type": "integer"},
        "seed": {"type": "integer"},
        "batch_size": {"type": "integer"},
        "publish": {
            "anyOf": [{"type": "boolean"}, {"type": "string", "enum": [PUBLISH_ADAPTER]}],
            "default": True,
            "description": "true: re-export and serve the result as a new model version when training succeeds; "
            "false: train only; adapter (flux_lora): publish it as the adapter `name`, chosen per request",
        },
        "name": {
            "type": "string",
            "maxLength": 64,
            "pattern": "^[a-z0-9][a-z0-9_-]*$",
            "description": "with publish=adapter: the adapter's name, unique (default: the job id)",
        },
    },
}
_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _FORM_SCHEMA}}}}


def _allowed(schema: dict[str, Any]) -> str:
    """ "allowed: 1..5000" from a field's JSON schema (bounds, enum), or "" when it has none."""
    for option in schema.get("anyOf", [schema]):
        lo = option.get("minimum", option.get("exclusiveMinimum"))
        hi = option.get("maximum", option.get("exclusiveMaximum"))
        if lo is not None or hi is not None:
            left = "(" if "exclusiveMinimum" in option else "["
            right = ")" if "exclusiveMaximum" in option else "]"
            return f" (allowed range {left}{lo if lo is not None else ''}, {hi if hi is not None else ''}{right})"
    return ""


def _validation_message(e: ValidationError, model: type[BaseModel], aliases: dict[str, str] | None = None) -> str:
    props = model.model_json_schema().get("properties", {})
    parts = []
    for err in e.errors():
        name = str(err["loc"][0]) if err["loc"] else "body"
        shown = (aliases or {}).get(name, name)
        parts.append(f"{shown}: {err['msg']}{_allowed(props.get(name, {}))}")
    return "; ".join(parts)


def _classifier_params(fields: dict[str, str]) -> dict[str, Any]:
    overrides = {
        "epochs": fields.get("steps"),
        "learning_rate": fields.get("learning_rate"),
        "seed": fields.get("seed"),
        "batch_size": fields.get("batch_size"),
    }
    try:
        params = ClassifierJobParams(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise UploadError(
            _validation_message(e, ClassifierJobParams, {"epochs": "steps (classifier epochs)"})
        ) from None
    return params.model_dump(exclude_none=True)


def _lora_settings(fields: dict[str, str]) -> LoraTrainSettings:
    if "trigger_word" not in fields:
        raise UploadError("trigger_word: field required")
    values = {
        k: fields[k] for k in ("steps", "rank", "learning_rate", "resolution", "seed", "batch_size") if k in fields
    }
    try:
        return LoraTrainSettings(**values)
    except ValidationError as e:
        raise UploadError(_validation_message(e, LoraTrainSettings)) from None


def _publish_mode(fields: dict[str, str]) -> PublishMode:
    value = fields.get("publish", "true")
    if value.strip().lower() == PUBLISH_ADAPTER:
        return PUBLISH_ADAPTER
    if "name" in fields:
        raise UploadError(f"name: only with publish={PUBLISH_ADAPTER} (it names the adapter the job publishes)")
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        raise UploadError(f"publish: must be true, false or {PUBLISH_ADAPTER}") from None


def _adapter_name(fields: dict[str, str], job_id: str) -> str:
    """The adapter name a publish=adapter job claims: the `name` field, else the job id."""
    try:
        return check_name(fields.get("name") or job_id)
    except InvalidAdapterName as e:
        raise UploadError(f"name: {e}") from None


def refuse_taken_name(store: JobStore, settings: JobSettings, name: str) -> None:
    """UploadError 409 when adapter `name` is published or an unfinished job will publish it. Called
    again right before the job is created, with no await between: within one facade two uploads
    cannot both claim a name; across facades the second publish fails (the store never overwrites)."""
    if adapter_exists(adapters_dir(settings.model_repository), name) or any(
        j.params.get(ADAPTER_NAME_PARAM) == name for j in store.unfinished()
    ):
        raise UploadError(f"an adapter named {name!r} already exists or is being trained; choose another name", 409)


async def refuse_unservable(settings: JobSettings, train: LoraTrainSettings) -> None:
    """UploadError 422 when the served transformer could not take this job's adapter: it has no
    adapter branch, or a bank of a lower rank than the job trains (publishing checks again)."""
    try:
        layout = await run_in_threadpool(served_bank_layout, settings.model_repository)
    except AdapterRefused as e:
        reason = str(e).replace(str(settings.model_repository), "the model repository")
        raise UploadError(f"publish: {PUBLISH_ADAPTER} is not served here: {reason}") from None
    if train.rank > layout.rank:
        raise UploadError(
            f"rank: at most {layout.rank} with publish={PUBLISH_ADAPTER} (the served adapter bank's rank), got {train.rank}"
        )


async def _prepare(request: Request, state: AppState, folder: Path, job_id: str) -> tuple[str, dict[str, Any]]:
    """Stream and validate the request into `folder`; the job's kind and params, or UploadError /
    DatasetError (the caller removes the folder)."""
    settings: JobSettings = state.job_settings
    upload_path = folder / "upload.zip"
    upload = await receive_multipart(request, UPLOAD_FIELD, upload_path, settings.max_upload_bytes, FORM_FIELDS)
    fields = upload.fields
    kind = fields.get("kind", DEFAULT_JOB_KIND)
    if kind not in JOB_KINDS:
        raise UploadError(f"kind must be one of {', '.join(repr(k) for k in JOB_KINDS)}")
    publish = _publish_mode(fields)
    if kind == "classifier":
        if publish == PUBLISH_ADAPTER:
            raise UploadError(
                f"publish: {PUBLISH_ADAPTER} is for flux_lora jobs; a classifier is published as a new "
                "model version (true) or not at all (false)"
            )
        return kind, {"train": _classifier_params(fields), "publish": publish}
    adapter = {}
    if publish == PUBLISH_ADAPTER:
        # Before the dataset is extracted and decoded: a taken name costs the caller nothing more.
        adapter = {ADAPTER_NAME_PARAM: _adapter_name(fields, job_id)}
        refuse_taken_name(state.jobs, settings, adapter[ADAPTER_NAME_PARAM])
    train = _lora_settings(fields)
    if adapter:
        await refuse_unservable(settings, train)
    if upload.file_bytes is None:
        raise UploadError(f"{UPLOAD_FIELD}: a zip file is required for flux_lora jobs")
    limits = DatasetLimits(max_zip_bytes=settings.max_upload_bytes)
    prepared = await run_in_threadpool(
        validate_and_extract, upload_path, folder / "dataset", fields["trigger_word"], limits
    )
    await run_in_threadpool(save_prepared, prepared)
    upload_path.unlink(missing_ok=True)
    return kind, {
        "train": train.model_dump(),
        "trigger_word": prepared.trigger_word,
        "publish": publish,
        **adapter,
        "dataset": {"images": prepared.count, "sha256": prepared.sha256},
    }


@router.post(
    "/train",
    status_code=202,
    openapi_extra=_OPENAPI,
    responses={**ERRORS, **{code: {"model": ErrorResponse} for code in (400, 409, 413, 415, 503, 507)}},
)
async def create_job(
    request: Request, state: Annotated[AppState, Depends(get_state)], owner: Annotated[str, Depends(require_operator)]
) -> JSONResponse:
    # Past the operator key (a router dependency, run first) and before the body is read: an
    # upload this facade could not take now is refused without reading it (api.upload_gate).
    limit = state.settings.max_concurrent_uploads
    if not state.uploads.try_take(limit):
        return uploads_busy(limit)
    try:
        refusal = await refuse_upload(state.jobs, state.job_settings, state.settings)
        return refusal if refusal is not None else await _accept(request, state, owner)
    finally:
        state.uploads.release()


async def _accept(request: Request, state: AppState, owner: str) -> JSONResponse:
    settings: JobSettings = state.job_settings
    job_id = uuid.uuid4().hex
    folder = job_dir(settings, job_id)
    folder.mkdir(parents=True)
    try:
        kind, params = await _prepare(request, state, folder, job_id)
        # Checked again now that the upload is in: the queue may have filled (or the last worker
        # died) while it streamed. A bad request was the caller's 4xx whatever our state; a good
        # one that no worker could take is a 503 with Retry-After rather than a job that waits forever.
        refusal = await refuse_new_job(state.jobs, settings)
        if refusal is None and ADAPTER_NAME_PARAM in params:
            refuse_taken_name(state.jobs, settings, params[ADAPTER_NAME_PARAM])  # no await from here to create
    except (UploadError, DatasetError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        status = e.status if isinstance(e, UploadError) else e.http_status
        error = "invalid_dataset" if isinstance(e, DatasetError) else "conflict" if status == 409 else "invalid_request"
        return envelope(status, error, str(e))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if kind == "classifier" or refusal is not None:
        shutil.rmtree(folder, ignore_errors=True)  # a classifier job uploads nothing; the worker makes its own
    if refusal is not None:
        return refusal
    # The record is created only now: a refused upload never shows up as a job, not even briefly.
    job = state.jobs.create(kind, params, job_id=job_id, owner=owner)
    return _enqueue(state, job.id)


def _enqueue(state: AppState, job_id: str) -> JSONResponse:
    """The record (`new`, invisible) exists; send the queue message, then make it `queued`. A
    crash between the two leaves a `new` record that the reaper fails after submit_timeout_s."""
    try:
        state.enqueue(job_id)
    except Exception:
        state.jobs.update(job_id, status="failed", error="could not reach the job queue")
        raise
    state.jobs.mark_queued(job_id)
    return JSONResponse(status_code=202, content={"job_id": job_id, "status": "queued"})


@router.get("/train", responses=ERRORS)
async def list_jobs(
    state: Annotated[AppState, Depends(get_state)],
    limit: Annotated[int, Query(ge=1, le=TRAIN_LIMITS.max_list_limit)] = 100,
) -> dict[str, list[dict]]:
    return {"jobs": [public_job(j, job_dir(state.job_settings, j.id)) for j in state.jobs.list(limit)]}


@router.get("/train/{job_id}", responses=ERRORS)
async def get_job(job_id: JobId, state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    job = state.jobs.get(job_id)
    if job is None:
        return envelope(404, "not_found", "no such job")
    return JSONResponse(public_job(job, job_dir(state.job_settings, job.id)))


@router.delete("/train/{job_id}", responses={**ERRORS, 409: {"model": ErrorResponse}})
async def cancel_job(job_id: JobId, state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    store = state.jobs
    job = store.get(job_id)
    if job is None:
        return envelope(404, "not_found", "no such job")
    if job.status in TERMINAL:
        return envelope(409, "conflict", f"job already {job.status}")
    job, outcome = store.cancel(job_id)
    if outcome == "publishing":
        # Publishing is short and transactional: it commits or rolls back, never half-aborts.
        return envelope(409, "conflict", "the job is publishing its model and cannot be cancelled now")
    if outcome == "finished":
        return envelope(409, "conflict", f"job already {job.status}")
    return JSONResponse(public_job(job, job_dir(state.job_settings, job.id)))


@router.get("/train/{job_id}/events", responses=ERRORS)
async def job_events(
    job_id: JobId,
    request: Request,
    state: Annotated[AppState, Depends(get_state)],
    poll_s: Annotated[float, Query(ge=TRAIN_LIMITS.min_poll_s, le=TRAIN_LIMITS.max_poll_s, allow_inf_nan=False)] = 0.5,
):
    store = state.jobs
    if store.get(job_id) is None:
        return envelope(404, "not_found", "no such job")
    folder = job_dir(state.job_settings, job_id)

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
                yield {
                    "event": "status" if job.status in TERMINAL else "progress",
                    "data": json.dumps(public_job(job, folder)),
                }
            if job.status in TERMINAL:
                return
            await asyncio.sleep(poll_s)

    return EventSourceResponse(stream())
