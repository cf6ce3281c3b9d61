"""The transformer model's adapter bank at run time (issue 27): adapters by name, per batch row.

Each `flux_transformer` call carries, beside the transformer's inputs, `adapter` (the adapter's
name per row, "" for none) and `adapter_scale` (its scale). The model owns a bank of slots
(serving.adapter_session.AdapterSession); this module maps names to slots:

- an adapter is loaded from the store (common.adapter_store, beside the model repository) into a
  free slot on first use, or into the least recently used slot no row of the current batch uses;
- a batch naming more distinct adapters than there are slots runs in rounds: the rows of later
  rounds wait for a slot (they are never dropped, and a round never evicts an adapter it uses);
- a row may name the version it began with, `<name>@<sha256>` (serving.adapter_choice sends it):
  slots hold versions, so a generation that began before the name was deleted and published again
  finishes on the weights it began with (while they are in a slot; evicted, its next step fails,
  rather than finishing on other weights than its answer names), and new generations load the new
  version beside it. A bare name means the current version; a deleted adapter already in a slot
  finishes the generations using it, a deleted one not loaded is an error.

Requests naming an unknown adapter, or one made for another base model, fail on their own
(ValueError, Triton's INVALID_ARG); the others run. Rows with different adapters share one
forward pass: step-level batching keeps working across adapters.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.adapter_bank import SCALE_INPUT, AdapterRefused, AdapterWeights, BankLayout, fit_factors
from common.adapter_store import (
    RECORD_FILE,
    AdapterNotFound,
    AdapterRecord,
    AdapterStoreError,
    check_name,
    read_adapter_record,
    read_factors,
    split_key,
    version_key,
)
from contract.specs import FLUX_ADAPTER_INPUT

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


class SlotTable:
    """Which adapter holds which bank slot (1..capacity), least recently used first.

    Pure bookkeeping: `assign` says which slot each wanted key gets and which of them must be
    loaded there first; it evicts only keys outside the wanted set."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"need at least one adapter slot, got {capacity}")
        self.capacity = capacity
        self._slots: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recently used first

    def slot_of(self, key: str) -> int | None:
        return self._slots.get(key)

    def loaded(self) -> dict[str, int]:
        return dict(self._slots)

    def forget(self, key: str) -> int | None:
        return self._slots.pop(key, None)

    def assign(self, wanted: Iterable[str]) -> tuple[dict[str, int], dict[str, int]]:
        """(slot of every wanted key, the keys to load and their slots). At most `capacity` keys."""
        keys = list(dict.fromkeys(wanted))
        if len(keys) > self.capacity:
            raise ValueError(f"{len(keys)} adapters in one round, only {self.capacity} slots")
        free = sorted(set(range(1, self.capacity + 1)) - set(self._slots.values()))
        to_load: dict[str, int] = {}
        for key in keys:
            if key in self._slots:
                continue
            if free:
                slot = free.pop(0)
            else:  # the least recently used adapter this round does not use
                victim = next(k for k in self._slots if k not in keys)
                slot = self._slots.pop(victim)
            self._slots[key] = slot
            to_load[key] = slot
        for key in keys:
            self._slots.move_to_end(key)
        return {k: self._slots[k] for k in keys}, to_load


def rounds(rows: Sequence[str | None], capacity: int) -> list[list[int]]:
    """Row indices split into rounds of at most `capacity` distinct adapters (None: no adapter,
    needs no slot), in arrival order: a row waits for a later round only when its round is full."""
    out: list[list[int]] = []
    seen: list[set[str]] = []
    for i, key in enumerate(rows):
        for r, keys in enumerate(seen):
            if key is None or key in keys or len(keys) < capacity:
                if key is not None:
                    keys.add(key)
                out[r].append(i)
                break
        else:
            seen.append(set() if key is None else {key})
            out.append([i])
    return out


@dataclass(frozen=True)
class _Known:
    record: AdapterRecord
    stamp: tuple[int, int, int]  # adapter.json's (inode, size, mtime): a republish changes it


class AdapterCatalog:
    """Adapter records from the store, re-read only when `adapter.json` changes (one stat per
    adapter per call), checked against the served bank's base model."""

    def __init__(self, root: Path, layout: BankLayout) -> None:
        self.root = Path(root)
        self.layout = layout
        self._known: dict[str, _Known] = {}

    def lookup(self, name: str) -> AdapterRecord:
        """The current record of `name`; AdapterNotFound, or AdapterRefused for another base."""
        check_name(name)
        try:
            st = os.stat(self.root / name / RECORD_FILE)
        except FileNotFoundError:
            self._known.pop(name, None)
            raise AdapterNotFound(name) from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        known = self._known.get(name)
        if known is None or known.stamp != stamp:
            record = read_adapter_record(self.root, name)
            base = self.layout.base_fingerprint
            if base and record.base_fingerprint != base:
                raise AdapterRefused(
                    f"adapter {name!r} was made for another base model (fingerprint {record.base_fingerprint}) "
                    f"than the served transformer's ({base})"
                )
            known = self._known[name] = _Known(record, stamp)
        return known.record

    def weights(self, record: AdapterRecord) -> AdapterWeights:
        return fit_factors(read_factors(self.root, record.name), self.layout)


class AdapterReplaced(AdapterStoreError):
    """A row names a version of an adapter that is neither the stored one nor in a slot."""


def _row_names(feeds: Mapping[str, np.ndarray], rows: int) -> list[str | None]:
    """The `adapter` input as one name (or None) per row; absent: no adapter anywhere."""
    raw = feeds.get(FLUX_ADAPTER_INPUT)
    if raw is None:
        return [None] * rows
    names = []
    for item in np.asarray(raw).reshape(-1):
        text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        names.append(text or None)
    if len(names) != rows:
        raise ValueError(f"{FLUX_ADAPTER_INPUT}: one name per row ({rows}), got {len(names)}")
    return names


class AdapterRunner:
    """Runs merged transformer batches whose rows name adapters: the session face that
    serving.onnx_runner.BatchedOnnxRunner merges requests for (`get_inputs`, `get_outputs`, `run`).

    `session` is an AdapterSession (or anything with its `layout`, `bank.slots`, `step_inputs`,
    `output_name`, `load` and `run`)."""

    def __init__(self, session, store_root: Path) -> None:
        self.session = session
        self.layout: BankLayout = session.layout
        self.catalog = AdapterCatalog(store_root, self.layout)
        self.table = SlotTable(session.bank.slots - 1)
        self._lock = threading.Lock()
        self.loads = 0
        """Adapters loaded into a slot since start (a measure of slot churn)."""

    # -- the session face BatchedOnnxRunner uses --------------------------------------------

    def get_inputs(self) -> list:
        ranks = {n: 1 if n in ("timestep", "guidance") else 3 for n in self.session.step_inputs}
        ranks |= {"pooled_projections": 2, FLUX_ADAPTER_INPUT: 2, SCALE_INPUT: 1}
        return [_Input(n, r) for n, r in ranks.items()]

    def get_outputs(self) -> list:
        return [_Input(self.session.output_name, 3)]

    def run(self, output_names: object, merged: Feeds) -> list[np.ndarray]:
        batch = merged["hidden_states"].shape[0]
        names = _row_names(merged, batch)
        scales = merged.get(SCALE_INPUT)
        scales = np.zeros(batch, np.float32) if scales is None else np.asarray(scales, np.float32).reshape(-1)
        with self._lock:  # one instance runs one execute at a time; the lock guards the table anyway
            resolved = {n: self._resolve(n) for n in dict.fromkeys(n for n in names if n)}
            keys = [resolved[n][0] if n else None for n in names]
            records = dict(resolved.values())
            out: np.ndarray | None = None
            for rows in rounds(keys, self.table.capacity):
                part = self._run_round(merged, rows, keys, scales, records)
                if out is None:
                    out = np.empty((batch, *part.shape[1:]), part.dtype)
                out[rows] = part
        assert out is not None
        return [out]

    # -- slots --------------------------------------------------------------------------

    def _loaded_version(self, name: str) -> str | None:
        """The slot key of the most recently used loaded version of `name`, if any."""
        prefix = version_key(name, "")
        return next((k for k in reversed(self.table.loaded()) if k.startswith(prefix)), None)

    def _resolve(self, requested: str) -> tuple[str, AdapterRecord | None]:
        """(slot key, the record to load it from, or None when it can only run from its slot).
        AdapterNotFound for a name neither stored nor loaded, AdapterReplaced for a version
        neither stored nor loaded."""
        name, wanted = split_key(requested)
        try:
            record: AdapterRecord | None = self.catalog.lookup(name)
        except AdapterNotFound:
            record = None
        if record is not None and wanted in (None, record.sha256):
            return version_key(name, record.sha256), record
        loaded = version_key(name, wanted) if wanted else self._loaded_version(name)
        if loaded is not None and self.table.slot_of(loaded) is not None:
            return loaded, None  # a generation that began before a delete (or a republish) finishes on it
        if record is None:
            raise AdapterNotFound(name)
        assert wanted is not None  # a bare name with a stored record returned above
        raise AdapterReplaced(
            f"adapter {name!r} was replaced (sha256 {record.sha256[:12]}) after this generation began "
            f"with {wanted[:12]}; send the request again"
        )

    def _run_round(
        self,
        merged: Feeds,
        rows: list[int],
        keys: list[str | None],
        scales: np.ndarray,
        records: Mapping[str, AdapterRecord | None],
    ) -> np.ndarray:
        wanted = [k for k in dict.fromkeys(keys[i] for i in rows) if k]
        slots, to_load = self.table.assign(wanted)
        for key, slot in to_load.items():
            record = records[key]
            if record is None:  # evicted by an earlier round and gone from the store: nothing to load
                self.table.forget(key)
                raise AdapterNotFound(split_key(key)[0])
            try:
                self.session.load(slot, self.catalog.weights(record))
            except Exception:
                self.table.forget(key)
                raise
            self.loads += 1
            log.info("adapter %s (sha256 %s) loaded into slot %d", record.name, record.sha256[:12], slot)
        index = np.asarray(rows)
        feeds = {n: merged[n][index] for n in self.session.step_inputs}
        row_slots = [slots[keys[i]] if keys[i] else 0 for i in rows]
        row_scales = [float(scales[i]) if keys[i] else 0.0 for i in rows]
        return self.session.run(feeds, row_slots, row_scales)

    def check_request(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise (ValueError) if a request names an adapter this model cannot use: before merging,
        so one bad request fails alone."""
        rows = np.asarray(feeds["hidden_states"]).shape[0]
        for name in dict.fromkeys(n for n in _row_names(feeds, rows) if n):
            try:
                with self._lock:  # the slot table is read
                    self._resolve(name)
            except AdapterStoreError as e:
                raise ValueError(str(e)) from None


@dataclass(frozen=True)
class _Input:
    """What BatchedOnnxRunner reads of an ONNX Runtime NodeArg: its name and rank."""

    name: str
    rank: int

    @property
    def shape(self) -> list[None]:
        return [None] * self.rank


def run_checked(
    runner: Callable[[Sequence[Feeds]], list[Feeds]], check: Callable[[Feeds], None], requests: Sequence[Feeds]
) -> list[Feeds | Exception]:
    """`runner` over the requests that pass `check`; the others get their own exception."""
    results: list[Feeds | Exception | None] = [None] * len(requests)
    good: list[int] = []
    for i, feeds in enumerate(requests):
        try:
            check(feeds)
            good.append(i)
        except ValueError as e:
            results[i] = e
    if good:
        for i, out in zip(good, runner([requests[i] for i in good])):
            results[i] = out
    return [r if r is not None else RuntimeError("no result") for r in results]
