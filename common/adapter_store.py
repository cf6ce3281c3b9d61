"""The adapter store (issue 27): published LoRAs served side by side, chosen per request by name.

One home for where adapters live and what an adapter is, shared by the publisher (publish/adapters.py
writes), the facade (lists, deletes) and the transformer model inside Triton (reads, on first use),
so it is numpy + pydantic + safetensors only: no torch, nothing of export/.

Layout: `adapters_dir(repository)` = `adapters/` beside the Triton model repository (outside it:
Triton must not take it for a model). One folder per adapter:

- `adapter.json`: the AdapterRecord (name, trigger words, rank, default scale, owner, the base
  model's fingerprint, the LoRA file's sha256, ...);
- `bank.safetensors`: the bank-ready factors, per adapted layer `<layer>.A` (in, r) and `<layer>.B`
  (r, out) float32, the LoRA's alpha/rank already folded into B (what the bank's slot holds);
- `lora.safetensors`: the LoRA file as published (provenance; re-conversion if the bank changes).

An adapter is written whole or not at all (a temporary folder renamed into place), and a name is
never overwritten: publishing a taken name fails (AdapterExists); delete it first.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

ADAPTERS_DIRNAME = "adapters"
RECORD_FILE = "adapter.json"
BANK_TENSORS_FILE = "bank.safetensors"
LORA_FILE = "lora.safetensors"
RECORD_FORMAT = "fluxserve-adapter/1"
NAME_MAX_CHARS = 64
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]*")
"""Lowercase letters, digits, `-` and `_`, not leading with a separator: safe as a folder name, in
a URL path and in a log line; a job id (32 hex digits) is one."""
MAX_SCALE = 2.0
"""lora_scale bounds (0..MAX_SCALE), the request's and the record's default alike."""
A_SUFFIX = ".A"
B_SUFFIX = ".B"
_STAGING_PREFIX = ".staging-"
_DELETING_PREFIX = ".deleting-"


class AdapterStoreError(ValueError):
    """Base of the store's errors; the message is safe to show a client."""


class AdapterNotFound(AdapterStoreError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no adapter named {name!r}")
        self.name = name


class AdapterExists(AdapterStoreError):
    def __init__(self, name: str) -> None:
        super().__init__(f"an adapter named {name!r} already exists (delete it first, or choose another name)")
        self.name = name


class InvalidAdapterName(AdapterStoreError):
    pass


def adapters_dir(repository: Path) -> Path:
    """The adapter store of a Triton model repository: `adapters/` beside it."""
    return Path(repository).resolve().parent / ADAPTERS_DIRNAME


def check_name(name: object) -> str:
    """`name` if it is a valid adapter name, else InvalidAdapterName saying why."""
    if not isinstance(name, str) or not name:
        raise InvalidAdapterName("adapter name must be a non-empty string")
    if len(name) > NAME_MAX_CHARS:
        raise InvalidAdapterName(f"adapter name is longer than {NAME_MAX_CHARS} characters")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidAdapterName(
            f"adapter name {name!r} is not a slug: use lowercase letters, digits, '-' and '_', starting with a letter or digit"
        )
    return name


def _name(value: str) -> str:
    try:
        return check_name(value)
    except InvalidAdapterName as e:
        raise ValueError(str(e)) from None


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class AdapterRecord(BaseModel):
    """What `adapter.json` holds: an adapter's identity, its defaults and where it came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = RECORD_FORMAT
    name: Annotated[str, AfterValidator(_name)]
    trigger_words: Annotated[str, Field(max_length=200)] = ""
    """Added to a request's prompt (common.trigger_word.with_trigger) when it names this adapter."""
    rank: Annotated[int, Field(ge=1)]
    """The LoRA's own (largest) rank; the bank pads it to its R."""
    scale: Annotated[float, Field(ge=0.0, le=MAX_SCALE, allow_inf_nan=False)] = 1.0
    """The default lora_scale (a request's own lora_scale overrides it)."""
    owner: str | None = None
    base_fingerprint: str
    """The base transformer the LoRA was trained on / converted for (the served bank layout's)."""
    sha256: str
    """Of the published LoRA file (`lora.safetensors`): which adapter made an image."""
    created: str
    """ISO 8601, UTC."""
    layers: Annotated[int, Field(ge=1)]
    """Adapted transformer layers."""
    tensor_bytes: Annotated[int, Field(ge=0)]
    """float32 bytes of the bank-ready factors at the adapter's own rank."""
    source: str | None = None
    """Where the LoRA came from (a job id, a path), for people."""


def _record_path(root: Path, name: str) -> Path:
    return Path(root) / check_name(name) / RECORD_FILE


def read_adapter_record(root: Path, name: str) -> AdapterRecord:
    """The record of adapter `name` in the store at `root`; AdapterNotFound when there is none."""
    path = _record_path(root, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise AdapterNotFound(name) from None
    try:
        return AdapterRecord.model_validate_json(text)
    except ValidationError as e:
        raise AdapterStoreError(f"adapter {name!r} has an unreadable record: {e.error_count()} error(s)") from None


def list_adapters(root: Path) -> list[AdapterRecord]:
    """Every adapter in the store, oldest first; unreadable ones are logged and left out."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for folder in root.iterdir():
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            out.append(read_adapter_record(root, folder.name))
        except AdapterStoreError as e:
            log.warning("adapter store %s: skipping %s (%s)", root, folder.name, e)
    return sorted(out, key=lambda r: (r.created, r.name))


VERSION_SEPARATOR = "@"
"""Between an adapter's name and its sha256 where a version is named (a transformer row's `adapter`,
serving.adapter_runner); names are slugs and never hold it."""


def version_key(name: str, sha256: str) -> str:
    return f"{name}{VERSION_SEPARATOR}{sha256}"


def split_key(key: str) -> tuple[str, str | None]:
    """(name, sha256 or None) of `name` or `name@sha256`."""
    name, _, sha256 = key.partition(VERSION_SEPARATOR)
    return name, sha256 or None


def adapter_exists(root: Path, name: str) -> bool:
    return _record_path(root, name).is_file()


def bank_tensors_path(root: Path, name: str) -> Path:
    return Path(root) / check_name(name) / BANK_TENSORS_FILE


def lora_path(root: Path, name: str) -> Path:
    return Path(root) / check_name(name) / LORA_FILE


def read_factors(root: Path, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Adapter `name`'s bank-ready factors: layer path -> (A (in, r), B (r, out)), float32."""
    from safetensors.numpy import load_file

    path = bank_tensors_path(root, name)
    if not path.is_file():
        raise AdapterNotFound(name)
    return factors_from_tensors(load_file(str(path)))


def factors_from_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    layers = {k[: -len(A_SUFFIX)] for k in tensors if k.endswith(A_SUFFIX)}
    if layers != {k[: -len(B_SUFFIX)] for k in tensors if k.endswith(B_SUFFIX)} or len(tensors) != 2 * len(layers):
        raise AdapterStoreError("bank tensors must be pairs `<layer>.A`, `<layer>.B`")
    return {p: (tensors[p + A_SUFFIX], tensors[p + B_SUFFIX]) for p in sorted(layers)}


def tensors_from_factors(factors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for path, (a, b) in factors.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise AdapterStoreError(f"{path}: factors {a.shape}, {b.shape} are not (in, r), (r, out)")
        out[path + A_SUFFIX] = np.ascontiguousarray(a, dtype=np.float32)
        out[path + B_SUFFIX] = np.ascontiguousarray(b, dtype=np.float32)
    return out


def write_adapter(
    root: Path,
    record: AdapterRecord,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    lora_file: Path,
) -> Path:
    """Write adapter `record.name` (its record, its factors, a copy of `lora_file`) into the store
    at `root`, whole or not at all; AdapterExists if the name is taken. Returns its folder."""
    from safetensors.numpy import save_file

    root = Path(root)
    name = check_name(record.name)
    final = root / name
    if final.exists():
        raise AdapterExists(name)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f"{_STAGING_PREFIX}{name}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        shutil.copyfile(lora_file, staging / LORA_FILE)
        save_file(tensors_from_factors(factors), str(staging / BANK_TENSORS_FILE))
        (staging / RECORD_FILE).write_text(record.model_dump_json(indent=1))
        try:
            # rename(2) onto an existing folder fails unless it is empty; ours never are.
            os.rename(staging, final)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise AdapterExists(name) from None
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("adapter %s written to %s (rank %d, %d layers)", name, final, record.rank, record.layers)
    return final


def delete_adapter(root: Path, name: str) -> AdapterRecord | None:
    """Remove adapter `name` (renamed away first, so readers see it whole or gone); returns its
    record, or None when its folder holds no readable record (written by another version, or
    damaged: it must still be removable, and its name free again). AdapterNotFound when there is
    no such folder."""
    check_name(name)
    try:
        record: AdapterRecord | None = read_adapter_record(root, name)
    except AdapterStoreError as e:  # AdapterNotFound included: a folder without its record
        log.warning("adapter store %s: deleting %s without a readable record (%s)", root, name, e)
        record = None
    doomed = Path(root) / f"{_DELETING_PREFIX}{name}-{secrets.token_hex(4)}"
    try:
        os.rename(Path(root) / name, doomed)
    except FileNotFoundError:  # deleted meanwhile by someone else
        raise AdapterNotFound(name) from None
    shutil.rmtree(doomed, ignore_errors=True)
    log.info("adapter %s deleted from %s", name, root)
    return record
