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

Bank layouts (common.adapter_bank.BankLayout, the data side: numpy only, what serving reads):
"per_layer" or "grouped"; both copy exactly the rows they use. `fluxserve-bench adapters` measures both.

This module is the torch side: the module that traces the branch, its ONNX export and check, and
reading a LoRA file into bank factors. The layout is written beside the model as `adapter_bank.json`;
serving.adapter_session.AdapterSession runs the graph with its bank bound once.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.adapter_bank import (
    BANK_FILE,
    DEFAULT_MAX_RANK,
    MAX_SLOTS,
    SCALE_INPUT,
    SLOT_INPUT,
    AdapterRefused,
    AdapterWeights,
    BankLayout,
    Layout,
    fit_factors,
)
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
"""The branch graph's folder when exported beside the plain one (the benchmark's)."""


# ----------------------------------------------------------------------------- the torch module


class AdapterFluxTransformer(BatchMajorFluxTransformer):
    """BatchMajorFluxTransformer plus the per-row low-rank branch on the layout's layers.

    The branch is added by forward hooks on the transformer's own Linear modules, so parameter
    names (and with them the weight map a LoRA patch uses) stay those of the plain export. The
    hooks live on the wrapped transformer: use this as a context manager (or call `remove`)."""

    def __init__(self, transformer: torch.nn.Module, layout: BankLayout) -> None:
        super().__init__(transformer)
        self.layout = layout
        self._rows: tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] | None = None
        modules = dict(transformer.named_modules())
        missing = [p for p in layout.layers if not isinstance(modules.get(p), torch.nn.Linear)]
        if missing:
            raise ValueError(f"layout names layers that are not Linear modules here: {missing[:5]}")
        self._hooks = [modules[p].register_forward_hook(self._hook(p)) for p in layout.layers]

    def _hook(self, path: str):
        group, index = self.layout.locate(path)

        def add_branch(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            if self._rows is None:  # called outside forward (plain use of the transformer)
                return out
            scale, banks = self._rows
            a_bank, b_bank, base = banks[group.name]  # per_layer: base = slot; grouped: slot * L
            rows = base if index == 0 else base + index
            a = a_bank.index_select(0, rows)  # (B, in, R)
            b = b_bank.index_select(0, rows)  # (B, R, out)
            x = args[0]
            if x.dim() != 3:  # FLUX's targeted Linears all see (B, T, in); anything else, flattened
                x = x.reshape(x.shape[0], -1, group.in_features)
            # The scale multiplies the (B, T, R) product, R columns instead of `out`.
            return out + torch.bmm(torch.bmm(x, a) * scale, b).reshape(out.shape)

        return add_branch

    def _prepared_banks(
        self, slot: torch.Tensor, banks: list[torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per group, once per call (not per layer: fewer graph nodes, a faster export): its A and
        B banks as (rows, in, R) and (rows, R, out), and each batch row's first row in them. The
        grouped layout flattens (S, L, ...) to (S * L, ...): layer i of slot s is row s * L + i."""
        named = dict(zip(self.layout.bank_inputs(), banks))
        out = {}
        for g in self.layout.groups:
            a, b = named[g.a_input], named[g.b_input]
            if self.layout.layout == "per_layer":
                out[g.name] = (a, b, slot)
            else:
                rank = self.layout.rank
                flat_a, flat_b = a.reshape(-1, g.in_features, rank), b.reshape(-1, rank, g.out_features)
                out[g.name] = (flat_a, flat_b, slot * len(g.layers))
        return out

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
        self._rows = (adapter_scale.reshape(-1, 1, 1), self._prepared_banks(adapter_slot, banks))
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
    folder: str = ADAPTER_TRANSFORMER,
    base_fingerprint: str = "",
) -> AdapterExport:
    """Export the branch graph of `transformer` (the fused default model) to
    `out_dir/<folder>/model.onnx` (`flux_transformer` when it is the served transformer), with the
    exporter settings of the plain transformer (export.flux.onnx_export), per-tensor weights and a
    weight map (so the default LoRA can be patched into it), and `adapter_bank.json` recording
    `base_fingerprint`; then check it against PyTorch."""
    from export.flux.weight_map import WEIGHT_MAP_FILE, WEIGHTS_DIR, externalize_and_map

    linears = branch_layers(transformer, layers)
    bank = BankLayout.build(linears, rank, layout, base_fingerprint)
    path = Path(out_dir) / folder / ONNX_FILE
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
        folder,
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


def adapter_from_deltas(deltas: Mapping[str, Any], layout: BankLayout) -> AdapterWeights:
    """AdapterWeights from export.flux.lora_deltas.LayerDelta's (lora_scale 1: the row's scale is
    applied in the graph). Refuses what the bank cannot hold, naming the limit."""
    factors = {
        path: (
            delta.down.detach().float().t().contiguous().numpy(),
            (delta.up.detach().float() * delta.scale).t().contiguous().numpy(),
        )
        for path, delta in deltas.items()
    }
    return fit_factors(factors, layout)


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
