"""Many LoRAs in one transformer graph: a low-rank branch per targeted Linear, chosen per batch row.

Issue 27: each Linear a LoRA may target computes `y = x·W + s_row · (x·A_row)·B_row`, where
A_row (in, R) and B_row (R, out) are gathered from an adapter bank by a per-row slot index and
s_row is the row's LoRA scale. The bank is data, not weights: graph INPUTS (`adapter_a.<group>`,
`adapter_b.<group>`) that ONNX Runtime reads from memory bound once (I/O binding), so any number
of LoRAs is served by one graph with no re-export, no weight copy per LoRA and no model load.

- Slot 0 is the zero adapter: a batch of slot 0 is the fused default model, exactly as the plain
  export (`flux_transformer`) computes it. The default LoRA stays fused into W (export.flux.
  weight_patch patches this graph as it patches the plain one: same initializers, same weight map).
- R, the largest rank served, is static in the graph; smaller ranks are zero-padded, as diffusers'
  hot-swap pads them. A higher rank, or a layer outside the branch set, is refused (AdapterRefused).
- The slot count is a dynamic axis: the caller picks it when it allocates the bank.
- int8 (export.flux.transformer_precision): `quantize_dynamic` only quantizes MatMuls whose B is a
  constant (MatMulConstBOnly, its default in dynamic mode), so the branch MatMuls, whose B comes
  from the bank, stay fp32 beside the int8 base MatMuls with no change to the quantizer.
- The LoRA's alpha/rank factor is folded into B when it is loaded; the row's scale is an input.

Bank layouts (BankLayout.layout): "per_layer" gives each layer its own pair of inputs, A (S, in,
R) and B (S, R, out); "grouped" packs the layers of one (in, out) shape into one pair, A (S, L,
in, R) and B (S, L, R, out), and the graph gathers row `slot * L + layer` of the flattened bank,
so both layouts copy exactly the rows they use. `fluxserve-bench adapters` measures both.

The layout is written beside the model as `adapter_bank.json`; AdapterSession reads it back.
"""

from __future__ import annotations

import json
import logging
import mmap
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from common.ort_session import make_session
from contract.specs import FLUX_IO_NAMES, FLUX_TRANSFORMER
from export.flux.onnx_export import (
    _MAX_BATCH,
    _MAX_IMAGE_TOKENS,
    _MAX_TEXT_LEN,
    DEFAULT_OPSET,
    ONNX_FILE,
    BatchMajorFluxTransformer,
    transformer_inputs,
)

log = logging.getLogger(__name__)

ADAPTER_TRANSFORMER = "flux_transformer_adapters"
"""The branch graph's folder (the model name serving will give it)."""
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
Layout = Literal["per_layer", "grouped"]
LAYOUTS: tuple[Layout, ...] = ("per_layer", "grouped")


class AdapterRefused(ValueError):
    """A LoRA the bank cannot hold: rank above R, a layer outside the branch set, a bad shape."""


# ----------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class BankGroup:
    """One pair of bank inputs: the layers (in order) whose A and B it holds."""

    name: str
    layers: tuple[str, ...]
    in_features: int
    out_features: int

    @property
    def a_input(self) -> str:
        return f"adapter_a.{self.name}"

    @property
    def b_input(self) -> str:
        return f"adapter_b.{self.name}"


@dataclass(frozen=True)
class BankLayout:
    """Which layers have a branch, the rank R, and how their banks are packed into inputs."""

    rank: int
    layout: Layout
    groups: tuple[BankGroup, ...]
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
    def build(cls, linears: Mapping[str, torch.nn.Linear], rank: int, layout: Layout) -> BankLayout:
        """The layout for `linears` (layer path -> Linear), in sorted path order."""
        paths = sorted(linears)
        if layout == "per_layer":
            groups = [BankGroup(p, (p,), linears[p].in_features, linears[p].out_features) for p in paths]
        else:
            shapes = sorted({(linears[p].in_features, linears[p].out_features) for p in paths})
            groups = [
                BankGroup(
                    f"{i}x{o}",
                    tuple(p for p in paths if (linears[p].in_features, linears[p].out_features) == (i, o)),
                    i,
                    o,
                )
                for i, o in shapes
            ]
        return cls(rank, layout, tuple(groups))

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
        return cls(int(d["rank"]), d["layout"], groups)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / BANK_FILE
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, folder: Path) -> BankLayout:
        return cls.from_json(json.loads((Path(folder) / BANK_FILE).read_text()))


# ----------------------------------------------------------------------------- the torch module


class AdapterFluxTransformer(BatchMajorFluxTransformer):
    """BatchMajorFluxTransformer plus the per-row low-rank branch on the layout's layers.

    The branch is added by forward hooks on the transformer's own Linear modules, so parameter
    names (and with them the weight map a LoRA patch uses) stay those of the plain export. The
    hooks live on the wrapped transformer: use this as a context manager (or call `remove`)."""

    def __init__(self, transformer: torch.nn.Module, layout: BankLayout) -> None:
        super().__init__(transformer)
        self.layout = layout
        self._rows: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None = None
        modules = dict(transformer.named_modules())
        missing = [p for p in layout.layers if not isinstance(modules.get(p), torch.nn.Linear)]
        if missing:
            raise ValueError(f"layout names layers that are not Linear modules here: {missing[:5]}")
        self._hooks = [modules[p].register_forward_hook(self._hook(p)) for p in layout.layers]

    def _hook(self, path: str):
        group, index = self.layout.locate(path)
        per_layer = self.layout.layout == "per_layer"

        def add_branch(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            if self._rows is None:  # called outside forward (plain use of the transformer)
                return out
            slot, scale, banks = self._rows
            a_bank, b_bank = banks[group.a_input], banks[group.b_input]
            if per_layer:
                rows = slot
            else:  # row `slot * L + index` of the bank flattened to (S * L, in, R)
                a_bank = a_bank.reshape(-1, group.in_features, self.layout.rank)
                b_bank = b_bank.reshape(-1, self.layout.rank, group.out_features)
                rows = slot * len(group.layers) + index
            a = a_bank.index_select(0, rows)  # (B, in, R)
            b = b_bank.index_select(0, rows)  # (B, R, out)
            x = args[0]
            batch = x.shape[0]
            # The scale multiplies the (B, T, R) product, R columns instead of `out`.
            low = torch.bmm(x.reshape(batch, -1, group.in_features), a) * scale.reshape(batch, 1, 1)
            return out + torch.bmm(low, b).reshape(out.shape)

        return add_branch

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> AdapterFluxTransformer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor,
        adapter_slot: torch.Tensor,
        adapter_scale: torch.Tensor,
        banks: list[torch.Tensor],
    ) -> torch.Tensor:
        self._rows = (adapter_slot, adapter_scale, dict(zip(self.layout.bank_inputs(), banks)))
        try:
            return super().forward(
                hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance
            )
        finally:
            self._rows = None


def branch_layers(transformer: torch.nn.Module, layers: Iterable[str] | None = None) -> dict[str, torch.nn.Linear]:
    """The Linear layers that get a branch: `layers` if given, else the LoRA targets
    (export.flux.lora.lora_target_modules, what the trainer adapts)."""
    from export.flux.lora import lora_target_modules

    if layers is None:
        return lora_target_modules(transformer)
    modules = dict(transformer.named_modules())
    return {p: modules[p] for p in layers}


# ----------------------------------------------------------------------------- export


@dataclass(frozen=True)
class AdapterExport:
    """The branch graph as exported, and how far ONNX Runtime is from PyTorch on it."""

    path: Path
    layout: BankLayout
    max_abs_error: float
    """Max |ONNX Runtime - PyTorch|, rows on slots 0 and two random adapters, a batch, shape and
    slot count the export never saw."""
    slot0_error: float
    """Max |ONNX Runtime slot 0 row - PyTorch without any branch|."""
    export_seconds: float


def _dynamic_shapes(layout: BankLayout) -> dict[str, object]:
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    tokens = torch.export.Dim("image_tokens", min=2, max=_MAX_IMAGE_TOKENS)
    text = torch.export.Dim("text_len", min=2, max=_MAX_TEXT_LEN)
    slots = torch.export.Dim("adapter_slots", min=1, max=MAX_SLOTS)
    return {
        "hidden_states": {0: batch, 1: tokens},
        "encoder_hidden_states": {0: batch, 1: text},
        "pooled_projections": {0: batch},
        "timestep": {0: batch},
        "img_ids": {0: batch, 1: tokens},
        "txt_ids": {0: batch, 1: text},
        "guidance": {0: batch},
        SLOT_INPUT: {0: batch},
        SCALE_INPUT: {0: batch},
        "banks": [{0: slots} for _ in layout.bank_inputs()],
    }


def random_bank(layout: BankLayout, slots: int, seed: int, std: float = 0.05) -> dict[str, np.ndarray]:
    """Bank arrays with random adapters in slots 1.. and zeros in slot 0 (for checks and benchmarks)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in layout.bank_shapes(slots).items():
        arr = (rng.standard_normal(shape) * std).astype(np.float32)
        arr[0] = 0.0
        out[name] = arr
    return out


def _torch_rows(
    module: AdapterFluxTransformer,
    feeds: Mapping[str, np.ndarray],
    slot: np.ndarray,
    scale: np.ndarray,
    bank: Mapping[str, np.ndarray],
) -> np.ndarray:
    names = FLUX_IO_NAMES[FLUX_TRANSFORMER][0]
    with torch.no_grad():
        return module(
            *(torch.from_numpy(feeds[n]) for n in names),
            torch.from_numpy(slot),
            torch.from_numpy(scale),
            [torch.from_numpy(bank[n]) for n in module.layout.bank_inputs()],
        ).numpy()


def export_adapter_transformer(
    transformer: torch.nn.Module,
    out_dir: Path,
    rank: int = DEFAULT_MAX_RANK,
    layout: Layout = "grouped",
    layers: Iterable[str] | None = None,
    opset: int = DEFAULT_OPSET,
) -> AdapterExport:
    """Export the branch graph of `transformer` (the fused default model) to
    `out_dir/flux_transformer_adapters/model.onnx`, with the exporter settings of the plain
    transformer (export.flux.onnx_export), per-tensor weights and a weight map (so the default
    LoRA can be patched into it), and `adapter_bank.json`; then check it against PyTorch."""
    from export.flux.weight_map import WEIGHT_MAP_FILE, WEIGHTS_DIR, externalize_and_map

    linears = branch_layers(transformer, layers)
    bank = BankLayout.build(linears, rank, layout)
    path = Path(out_dir) / ADAPTER_TRANSFORMER / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (*path.parent.glob(ONNX_FILE + "*"), path.parent / WEIGHT_MAP_FILE, path.parent / BANK_FILE):
        stale.unlink(missing_ok=True)
    shutil.rmtree(path.parent / WEIGHTS_DIR, ignore_errors=True)
    names = [*FLUX_IO_NAMES[FLUX_TRANSFORMER][0], SLOT_INPUT, SCALE_INPUT, *bank.bank_inputs()]
    # Sample sizes all >= 2 and pairwise different (a size-1 axis is specialised, equal ones tied).
    sample = transformer_inputs(transformer, 2, 8, 12, 12, seed=0)
    sample_bank = random_bank(bank, 5, seed=0)
    started = time.monotonic()
    with AdapterFluxTransformer(transformer, bank) as module:
        module.eval()
        args = (
            *(torch.from_numpy(v) for v in sample.values()),
            torch.tensor([0, 3]),
            torch.tensor([1.0, 0.5]),
            [torch.from_numpy(sample_bank[n]) for n in bank.bank_inputs()],
        )
        with torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=list(FLUX_IO_NAMES[FLUX_TRANSFORMER][1]),
                dynamic_shapes=_dynamic_shapes(bank),
                optimize=True,
            )
        program.save(str(path), external_data=True)
        externalize_and_map(path, transformer, "transformer.", set(linears))
        bank.save(path.parent)
        export_s = time.monotonic() - started
        err, slot0_err = _check(module, path)
    log.info(
        "%s (%s, rank %d, %d layers): exported in %.1fs to %s; max |ORT - torch| = %.3g, slot 0 vs no branch %.3g",
        ADAPTER_TRANSFORMER,
        layout,
        rank,
        len(linears),
        export_s,
        path,
        err,
        slot0_err,
    )
    return AdapterExport(path, bank, err, slot0_err, export_s)


def _check(module: AdapterFluxTransformer, path: Path) -> tuple[float, float]:
    """(max |ORT - torch| on mixed slots, max |ORT slot-0 row - torch without the branch|)."""
    check = transformer_inputs(module.transformer, 3, 20, 16, 20, seed=1)
    bank = random_bank(module.layout, 7, seed=1)
    slot, scale = np.array([0, 3, 6], np.int64), np.array([1.0, 0.5, 2.0], np.float32)
    ref = _torch_rows(module, check, slot, scale, bank)
    with torch.no_grad():  # outside forward the hooks add nothing: the plain transformer
        plain = BatchMajorFluxTransformer.forward(module, *(torch.from_numpy(v) for v in check.values())).numpy()
    sess = make_session(path, 0, spinning=True)
    (got,) = sess.run(None, {**check, SLOT_INPUT: slot, SCALE_INPUT: scale, **bank})
    if got.shape != ref.shape:
        return float("inf"), float("inf")
    return float(np.abs(got - ref).max()), float(np.abs(got[0] - plain[0]).max())


# ----------------------------------------------------------------------------- adapters


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


def adapter_from_deltas(deltas: Mapping[str, Any], layout: BankLayout) -> AdapterWeights:
    """AdapterWeights from export.flux.lora_deltas.LayerDelta's (lora_scale 1: the row's scale is
    applied in the graph). Refuses what the bank cannot hold, naming the limit."""
    if not deltas:
        raise AdapterRefused("the LoRA adapts no transformer layer")
    outside = sorted(set(deltas) - set(layout.layers))
    if outside:
        raise AdapterRefused(
            f"the LoRA adapts {len(outside)} layer(s) outside the adapter branch set "
            f"({len(layout.layers)} layers, the LoRA targets this graph was exported with): {outside[:5]}"
        )
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path, delta in sorted(deltas.items()):
        rank = int(delta.down.shape[0])
        if rank > layout.rank:
            raise AdapterRefused(f"{path}: LoRA rank {rank} exceeds the adapter bank's max rank {layout.rank}")
        group, _ = layout.locate(path)
        want = ((rank, group.in_features), (group.out_features, rank))
        if (tuple(delta.down.shape), tuple(delta.up.shape)) != want:
            raise AdapterRefused(
                f"{path}: LoRA factors {tuple(delta.down.shape)}, {tuple(delta.up.shape)} do not fit the layer "
                f"({group.in_features} in, {group.out_features} out)"
            )
        a = delta.down.detach().float().t().contiguous().numpy()
        b = (delta.up.detach().float() * delta.scale).t().contiguous().numpy()
        factors[path] = (a, b)
    return AdapterWeights(max(a.shape[1] for a, _ in factors.values()), factors)


def read_adapter(lora: str | Path, layout: BankLayout, weight_name: str | None = None) -> AdapterWeights:
    """A LoRA file (PEFT/diffusers, Kohya, ai-toolkit: whatever diffusers' FLUX loader reads,
    through export.flux.lora_deltas) as AdapterWeights for `layout`."""
    from export.flux.lora_deltas import NotPatchable, layer_deltas, load_lora_state

    state, alphas, metadata = load_lora_state(lora, weight_name)
    foreign = sorted({key.split(".", 1)[0] for key in state} - {"transformer"})
    if foreign:
        raise AdapterRefused(f"the LoRA has weights for {foreign}: the adapter bank holds transformer layers only")
    try:
        deltas = layer_deltas(state, alphas, metadata, "transformer.", 1.0)
    except NotPatchable as e:
        raise AdapterRefused(str(e)) from e
    return adapter_from_deltas(deltas, layout)


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


class AdapterSession:
    """An ONNX Runtime session of the branch graph that owns its bank and binds it once.

    The bank arrays are bound through one IOBinding as OrtValues over the arrays' own memory
    (no copy); they are re-bound only when a slot changes. A step binds just the transformer's
    inputs, the per-row slots and scales. One step or slot change at a time (a lock): a slot is
    never rewritten under a running step."""

    def __init__(
        self, model_path: Path, slots: int = DEFAULT_SLOTS, intra_op_threads: int = 1, spinning: bool = False
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.layout = BankLayout.load(Path(model_path).parent)
        self.session = make_session(Path(model_path), intra_op_threads, spinning=spinning)
        self.bank = AdapterBank(self.layout, slots)
        self._lock = threading.Lock()
        self._binding = self.session.io_binding()
        self._step_inputs = list(FLUX_IO_NAMES[FLUX_TRANSFORMER][0])
        self._output = self.session.get_outputs()[0].name
        self.bank_values: dict[str, Any] = {}
        self._bind_bank()

    def _bind_bank(self) -> None:
        for name, arr in self.bank.arrays.items():
            value = self._ort.OrtValue.ortvalue_from_numpy(arr)
            self._binding.bind_ortvalue_input(name, value)
            self.bank_values[name] = value  # the binding does not keep it alive

    def load(self, slot: int, adapter: AdapterWeights) -> None:
        with self._lock:
            self.bank.put(slot, adapter)
            self._bind_bank()

    def unload(self, slot: int) -> None:
        with self._lock:
            self.bank.clear(slot)
            self._bind_bank()

    def run(self, inputs: Mapping[str, np.ndarray], slots: Iterable[int], scales: Iterable[float]) -> np.ndarray:
        """One transformer step: `inputs` by contract name (batch-major), a slot and a scale per row."""
        slot = np.ascontiguousarray(np.fromiter(slots, np.int64))
        scale = np.ascontiguousarray(np.fromiter(scales, np.float32))
        batch = inputs["hidden_states"].shape[0]
        if slot.shape != (batch,) or scale.shape != (batch,):
            raise ValueError(f"need one slot and one scale per row ({batch}), got {slot.shape[0]} and {scale.shape[0]}")
        if slot.size and (slot.min() < 0 or slot.max() >= self.bank.slots):
            raise ValueError(f"slots must be in 0..{self.bank.slots - 1}, got {slot.tolist()}")
        if not np.isfinite(scale).all():
            raise ValueError("adapter scales must be finite")
        # Held until the run ends: the binding points at these arrays' memory.
        feeds = {n: np.ascontiguousarray(inputs[n], dtype=np.float32) for n in self._step_inputs}
        feeds |= {SLOT_INPUT: slot, SCALE_INPUT: scale}
        with self._lock:
            for name, arr in feeds.items():
                self._binding.bind_cpu_input(name, arr)
            self._binding.bind_output(self._output)
            self.session.run_with_iobinding(self._binding)
            return self._binding.copy_outputs_to_cpu()[0]


def quantize_adapter_export(export_dir: Path) -> Path:
    """`export_dir/int8/model.onnx` from the branch graph in `export_dir`, built exactly as the
    plain transformer's int8 graph (export.flux.transformer_precision.quantize_export): the
    quantizer leaves MatMuls with a non-constant B in fp32, so the branch stays fp32. The bank
    layout is copied beside it."""
    from export.flux.transformer_precision import INT8_DIR, quantize_export

    export_dir = Path(export_dir)
    path = quantize_export(export_dir, export_dir / INT8_DIR)
    shutil.copy2(export_dir / BANK_FILE, path.parent / BANK_FILE)
    return path
