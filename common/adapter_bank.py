"""The adapter bank's data side (issue 27): numpy only, shared by the export (export/flux/adapter_bank.py,
which builds the branch graph with torch), the publisher (publish/adapters.py) and the transformer
model inside Triton (serving/), which must not import torch or export/.

The branch graph computes, on each Linear a LoRA may target, `y = x·W + s_row · (x·A_row)·B_row`,
where A_row (in, R) and B_row (R, out) are gathered from the bank by a per-row slot index and
s_row is the row's LoRA scale. The bank is graph INPUTS (`adapter_a.<group>`, `adapter_b.<group>`).
Slot 0 is the zero adapter (the fused default model); R, the largest rank served, is static, and
smaller ranks are zero-padded.

Bank layouts (BankLayout.layout): "per_layer" gives each layer its own pair of inputs, A (S, in,
R) and B (S, R, out); "grouped" packs the layers of one (in, out) shape into one pair, A (S, L,
in, R) and B (S, L, R, out), and the graph gathers row `slot * L + layer` of the flattened bank.

The layout is written beside the model as `adapter_bank.json`, with the fingerprint of the base
transformer it was exported from: an adapter made for another base is refused.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

SLOT_INPUT = "adapter_slot"
"""int64 (B,): the bank slot each batch row reads; 0 = no adapter."""
SCALE_INPUT = "adapter_scale"
"""float32 (B,): each row's LoRA scale (the request's lora_scale)."""
BANK_FILE = "adapter_bank.json"
BANK_FORMAT = "fluxserve-adapter-bank/1"
DEFAULT_MAX_RANK = 16
"""The bank's R: FLUX LoRAs are mostly rank 4-16 (the trainer's default is 4)."""
DEFAULT_SLOTS = 8
"""Bank slots including the zero slot 0."""
MAX_SLOTS = 4096
BANK_INPUT_PREFIXES = ("adapter_a.", "adapter_b.")
Layout = Literal["per_layer", "grouped"]
LAYOUTS: tuple[Layout, ...] = ("per_layer", "grouped")


class AdapterRefused(ValueError):
    """A LoRA the bank cannot hold: rank above R, a layer outside the branch set, a bad shape,
    another base model. The message names the limit."""


class LinearShape(Protocol):
    in_features: int
    out_features: int


@dataclass(frozen=True)
class BankGroup:
    """One pair of bank inputs: the layers (in order) whose A and B it holds."""

    name: str
    layers: tuple[str, ...]
    in_features: int
    out_features: int

    @property
    def a_input(self) -> str:
        return f"{BANK_INPUT_PREFIXES[0]}{self.name}"

    @property
    def b_input(self) -> str:
        return f"{BANK_INPUT_PREFIXES[1]}{self.name}"


@dataclass(frozen=True)
class BankLayout:
    """Which layers have a branch, the rank R, and how their banks are packed into inputs."""

    rank: int
    layout: Layout
    groups: tuple[BankGroup, ...]
    base_fingerprint: str = ""
    """The base transformer the graph was exported from ("" when not recorded)."""
    _where: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        for g_index, g in enumerate(self.groups):
            for l_index, path in enumerate(g.layers):
                self._where[path] = (g_index, l_index)

    @classmethod
    def build(
        cls, linears: Mapping[str, LinearShape], rank: int, layout: Layout, base_fingerprint: str = ""
    ) -> BankLayout:
        """The layout for `linears` (layer path -> a Linear, or anything with its in/out features),
        in sorted path order."""
        paths = sorted(linears)
        shape = {p: (linears[p].in_features, linears[p].out_features) for p in paths}
        if layout == "per_layer":
            groups = [BankGroup(p, (p,), *shape[p]) for p in paths]
        else:
            groups = [
                BankGroup(f"{i}x{o}", tuple(p for p in paths if shape[p] == (i, o)), i, o)
                for i, o in sorted(set(shape.values()))
            ]
        return cls(rank, layout, tuple(groups), base_fingerprint)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(p for g in self.groups for p in g.layers)

    def locate(self, path: str) -> tuple[BankGroup, int]:
        g_index, l_index = self._where[path]
        return self.groups[g_index], l_index

    def bank_inputs(self) -> list[str]:
        return [name for g in self.groups for name in (g.a_input, g.b_input)]

    def bank_shapes(self, slots: int) -> dict[str, tuple[int, ...]]:
        """Input name -> shape of the arrays the graph takes for `slots` slots."""
        out: dict[str, tuple[int, ...]] = {}
        for g in self.groups:
            packed = () if self.layout == "per_layer" else (len(g.layers),)
            out[g.a_input] = (slots, *packed, g.in_features, self.rank)
            out[g.b_input] = (slots, *packed, self.rank, g.out_features)
        return out

    def slot_bytes(self) -> int:
        """float32 bytes one slot of the bank holds (every layer at rank R)."""
        return 4 * self.rank * sum(len(g.layers) * (g.in_features + g.out_features) for g in self.groups)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": BANK_FORMAT,
            "rank": self.rank,
            "layout": self.layout,
            "base_fingerprint": self.base_fingerprint,
            "slot_input": SLOT_INPUT,
            "scale_input": SCALE_INPUT,
            "groups": [
                {"name": g.name, "layers": list(g.layers), "in": g.in_features, "out": g.out_features}
                for g in self.groups
            ],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BankLayout:
        if d.get("format") != BANK_FORMAT:
            raise ValueError(f"unknown adapter bank format {d.get('format')!r}")
        groups = tuple(BankGroup(g["name"], tuple(g["layers"]), g["in"], g["out"]) for g in d["groups"])
        return cls(int(d["rank"]), d["layout"], groups, str(d.get("base_fingerprint") or ""))

    def save(self, folder: Path) -> Path:
        path = Path(folder) / BANK_FILE
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, folder: Path) -> BankLayout:
        return cls.from_json(json.loads((Path(folder) / BANK_FILE).read_text()))

    @staticmethod
    def exists(folder: Path) -> bool:
        """Whether `folder` (a model export or version folder) holds a branch graph."""
        return (Path(folder) / BANK_FILE).is_file()


@dataclass(frozen=True)
class AdapterWeights:
    """A LoRA as the bank takes it: per layer A (in, r) and B (r, out), alpha/rank folded into B."""

    rank: int
    """The largest rank among its layers."""
    factors: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        """The adapter's own tensors (fp32, at its own rank)."""
        return sum(a.nbytes + b.nbytes for a, b in self.factors.values())


def fit_factors(factors: Mapping[str, tuple[np.ndarray, np.ndarray]], layout: BankLayout) -> AdapterWeights:
    """`factors` (layer path -> A (in, r), B (r, out)) checked against `layout`, as AdapterWeights.
    Refuses what the bank cannot hold (AdapterRefused naming the limit)."""
    if not factors:
        raise AdapterRefused("the LoRA adapts no transformer layer")
    outside = sorted(set(factors) - set(layout.layers))
    if outside:
        raise AdapterRefused(
            f"the LoRA adapts {len(outside)} layer(s) outside the adapter branch set "
            f"({len(layout.layers)} layers, the LoRA targets this graph was exported with): {outside[:5]}"
        )
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path, (a, b) in sorted(factors.items()):
        group, _ = layout.locate(path)
        rank = int(a.shape[-1]) if a.ndim == 2 else -1
        if rank > layout.rank:
            raise AdapterRefused(f"{path}: LoRA rank {rank} exceeds the adapter bank's max rank {layout.rank}")
        if a.shape != (group.in_features, rank) or b.shape != (rank, group.out_features):
            raise AdapterRefused(
                f"{path}: LoRA factors A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the layer "
                f"({group.in_features} in, {group.out_features} out)"
            )
        out[path] = (np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32))
    return AdapterWeights(max(a.shape[1] for a, _ in out.values()), out)


def lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros in an anonymous mapping: pages become resident only when written. (np.zeros
    may be served from heap memory the allocator already holds and zeroes, all resident at once.)"""
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(4 * count, 1))
    return np.frombuffer(buf, np.float32, count=count).reshape(shape)  # keeps `buf` alive


class AdapterBank:
    """The bank as numpy arrays, one per bank input (shapes BankLayout.bank_shapes), slot 0 zero.

    The arrays are lazily backed (lazy_zeros), so memory grows by a slot's bytes per loaded
    adapter, not by the whole bank at start."""

    def __init__(self, layout: BankLayout, slots: int = DEFAULT_SLOTS) -> None:
        if not 2 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be in 2..{MAX_SLOTS} (slot 0 is the zero adapter), got {slots}")
        self.layout = layout
        self.slots = slots
        self.arrays = {name: lazy_zeros(shape) for name, shape in layout.bank_shapes(slots).items()}

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range: adapters go in slots 1..{self.slots - 1} (0 is no adapter)")

    def _cells(self, slot: int, path: str) -> tuple[np.ndarray, np.ndarray]:
        group, index = self.layout.locate(path)
        a, b = self.arrays[group.a_input][slot], self.arrays[group.b_input][slot]
        return (a, b) if self.layout.layout == "per_layer" else (a[index], b[index])

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for arr in self.arrays.values():
            arr[slot] = 0.0

    def put(self, slot: int, adapter: AdapterWeights) -> None:
        """Write `adapter` into `slot`, zero-padded to R; layers it does not adapt read zero."""
        self._check_slot(slot)
        unknown = sorted(set(adapter.factors) - set(self.layout.layers))
        if unknown or adapter.rank > self.layout.rank:
            raise AdapterRefused(f"adapter does not fit this bank (rank {adapter.rank}, layers {unknown[:3]})")
        self.clear(slot)
        for path, (a, b) in adapter.factors.items():
            a_cell, b_cell = self._cells(slot, path)
            a_cell[:, : a.shape[1]] = a
            b_cell[: b.shape[0], :] = b


def zero_branch_feeds(graph_inputs: Iterable[Any], batch: int) -> dict[str, np.ndarray]:
    """For a graph's inputs (ONNX Runtime NodeArgs: `name`, `shape`), the branch inputs that make
    `batch` rows run without any adapter (slot 0, scale 0, a one-slot zero bank); {} for a graph
    without the branch. What a caller that knows nothing of adapters feeds the branch graph to get
    the plain model: the in-process pipelines, the int8 parity check."""
    feeds: dict[str, np.ndarray] = {}
    for arg in graph_inputs:
        if arg.name == SLOT_INPUT:
            feeds[arg.name] = np.zeros(batch, np.int64)
        elif arg.name == SCALE_INPUT:
            feeds[arg.name] = np.zeros(batch, np.float32)
        elif arg.name.startswith(BANK_INPUT_PREFIXES):
            feeds[arg.name] = np.zeros((1, *(int(d) for d in arg.shape[1:])), np.float32)
    return feeds
