"""GET /loras, GET /loras/{name}, DELETE /loras/{name}: the published adapters (issue 27), which a
/generate or /chat request names in `lora`. Adapters are published by training jobs
(`POST /train` with publish=adapter) into the adapter store (common.adapter_store) beside the model
repository; the transformer loads one into a bank slot when a request first names it.

Every route needs the operator key, as reading jobs does: a record names its owner (an operator
key's name), and the list is the output of training jobs. Deleting one takes effect for requests
that arrive afterwards; images already being made with it finish with it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.auth import require_operator
from api.errors import envelope
from api.schemas import ErrorResponse, LoraInfo, LoraList
from api.state import AppState, get_state
from common.adapter_store import (
    NAME_MAX_CHARS,
    AdapterExists,
    AdapterNotFound,
    AdapterRecord,
    AdapterStoreError,
    InvalidAdapterName,
    adapters_dir,
    delete_adapter,
    list_adapters,
    read_adapter_record,
)

router = APIRouter(tags=["loras"], dependencies=[Depends(require_operator)])
ERRORS = {
    401: {"model": ErrorResponse},
    404: {"model": ErrorResponse, "description": "no adapter of that name"},
    422: {"model": ErrorResponse, "description": "not an adapter name"},
}
# Longer than any name, so a long one reaches check_name and is refused with its reason.
Name = Annotated[str, PathParam(max_length=4 * NAME_MAX_CHARS)]


def lora_info(record: AdapterRecord) -> LoraInfo:
    return LoraInfo.model_validate(record.model_dump(include=set(LoraInfo.model_fields)))


def adapter_error(e: AdapterStoreError) -> JSONResponse:
    """The one mapping of the adapter store's errors to answers: its messages are safe to show."""
    if isinstance(e, AdapterNotFound):
        return envelope(404, "not_found", str(e))
    if isinstance(e, AdapterExists):
        return envelope(409, "conflict", str(e))
    if isinstance(e, InvalidAdapterName):
        return envelope(422, "invalid_request", str(e))
    return envelope(422, "invalid_request", str(e))  # a record this server cannot read


@router.get("/loras", responses={401: {"model": ErrorResponse}})
async def list_loras(state: Annotated[AppState, Depends(get_state)]) -> LoraList:
    root = adapters_dir(state.job_settings.model_repository)
    records = await run_in_threadpool(list_adapters, root)
    return LoraList(loras=[lora_info(r) for r in records])


@router.get("/loras/{name}", response_model=LoraInfo, responses=ERRORS)
async def get_lora(name: Name, state: Annotated[AppState, Depends(get_state)]) -> LoraInfo | JSONResponse:
    root = adapters_dir(state.job_settings.model_repository)
    try:
        return lora_info(await run_in_threadpool(read_adapter_record, root, name))
    except AdapterStoreError as e:
        return adapter_error(e)


@router.delete("/loras/{name}", response_model=LoraInfo, responses=ERRORS)
async def remove_lora(name: Name, state: Annotated[AppState, Depends(get_state)]) -> LoraInfo | JSONResponse:
    """Removes the adapter; the answer is its record as it was, or only its name when the record
    could not be read (a damaged adapter is removable too, and its name free again)."""
    root = adapters_dir(state.job_settings.model_repository)
    try:
        record = await run_in_threadpool(delete_adapter, root, name)
    except AdapterStoreError as e:
        return adapter_error(e)
    if record is None:
        return JSONResponse({"name": name, "deleted": True, "detail": "its record could not be read"})
    return lora_info(record)
