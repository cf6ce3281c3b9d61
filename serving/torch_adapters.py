"""The adapter branch on the gpu-torch transformer (issues 27 and 28): published LoRAs chosen per
batch row, in PyTorch on the transformer's device.

The same branch as the CPU target's graph (export/flux/adapter_bank.py): on every layer of the bank
layout the transformer's version ships (`adapter_bank.json`, common.adapter_bank.BankLayout),
`y = x·W + s_row·(x·A_row)·B_row`, with A_row (in, R) and B_row (R, out) gathered from the bank by
the row's slot (index_select) and s_row the row's scale. Slot 0 is the zero adapter.

- The bank is tensors on the device in the compute dtype, one per bank input with the CPU graph's
  shapes (BankLayout.bank_shapes), so what publish_adapter stores loads unchanged. A slot is written
  in place when an adapter is loaded into it; a step gathers only the rows it uses and never copies
  the bank (compiled code and CUDA graphs keep its addresses).
- The branch is forward hooks on the transformer's own layers: their names and weights stay what
  serving/torch_lora.py patches, so the pipeline's default LoRA in W (patched in place) and a row's
  adapter on the branch add up, as the CPU graph's fused default and its branch do. With fused q/k/v
  a layer's branch adds to its third of `to_qkv`'s output; on fp8 layers it runs in the compute
  dtype on the layer's input.
- A batch in which no row has an adapter (slot 0 or scale 0 everywhere) runs no branch at all: the
  plain transformer, bit for bit. In a mixed batch a slot 0 row adds exact zeros.
- Names to slots (first use, LRU that never evicts what a batch uses, rounds, the store, republish
  and delete) are serving.adapter_runner.AdapterRunner's: it drives this session as it drives the
  ONNX one (serving/adapter_session.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.adapter_bank import DEFAULT_SLOTS, MAX_SLOTS, AdapterBank, AdapterWeights, BankLayout
from common.adapter_store import adapters_dir
from contract.specs import ADAPTER_SLOTS_PARAMETER, FLUX_TRANSFORMER
from serving.adapter_runner import AdapterRunner
from serving.torch_components import TorchComponent
from serving.torch_lora import linear_target

log = logging.getLogger(__name__)


class TorchAdapterBank:
    """The bank on a device: one tensor per bank input (BankLayout.bank_shapes(slots)), slot 0 zero."""

    def __init__(self, layout: BankLayout, slots: int, device: torch.device, dtype: torch.dtype) -> None:
        if not 2 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be in 2..{MAX_SLOTS} (slot 0 is the zero adapter), got {slots}")
        self.layout, self.slots = layout, slots
        self.tensors = {
            name: torch.zeros(shape, device=device, dtype=dtype) for name, shape in layout.bank_shapes(slots).items()
        }
        for tensor in self.tensors.values():
            # Written in place only, so its address never changes: CUDA graphs (torch.compile's
            # reduce-overhead) read it where it lies instead of copying it into the graph per step.
            torch._dynamo.mark_static_address(tensor)

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range: adapters go in slots 1..{self.slots - 1} (0 is no adapter)")

    @torch.no_grad()
    def put(self, slot: int, adapter: AdapterWeights) -> None:
        """Write `adapter` into `slot` in place, zero-padded to R (layers it does not adapt read zero)."""
        self._check_slot(slot)
        # The numpy bank packs and checks a slot exactly as the CPU target's does; only its slot 1
        # is ever written, so only that much host memory becomes resident.
        staged = AdapterBank(self.layout, 2)
        staged.put(1, adapter)
        for name, tensor in self.tensors.items():
            tensor[slot].copy_(torch.from_numpy(staged.arrays[name][1]))

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for tensor in self.tensors.values():
            tensor[slot].zero_()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class _Part:
    """One bank layer's branch on a hooked module: its bank inputs and the output columns it adds to."""

    a_input: str
    b_input: str
    index: int | None
    """The layer's place in a grouped bank (row `slot * layers + index`); None: per_layer."""
    layers: int
    columns: slice


def row_slots_and_scales(
    slots: Iterable[int], scales: Iterable[float], batch: int, bank_slots: int
) -> tuple[np.ndarray, np.ndarray]:
    """One slot (int64) and one scale (float32) per row, checked: slots in the bank, scales finite."""
    slot = np.fromiter(slots, np.int64)
    scale = np.fromiter(scales, np.float32)
    if slot.shape != (batch,) or scale.shape != (batch,):
        raise ValueError(f"need one slot and one scale per row ({batch}), got {slot.shape[0]} and {scale.shape[0]}")
    if slot.size and (slot.min() < 0 or slot.max() >= bank_slots):
        raise ValueError(f"slots must be in 0..{bank_slots - 1}, got {slot.tolist()}")
    if not np.isfinite(scale).all():
        raise ValueError("adapter scales must be finite")
    return slot, scale


class TorchAdapterSession:
    """A gpu-torch transformer (TorchComponent) with the branch hooked onto its layers and its bank
    on its device: the session face AdapterRunner drives (`layout`, `bank.slots`, `step_inputs`,
    `output_name`, `load`, `run`).

    One step or slot change at a time (a lock): a slot is never rewritten under a running step."""

    def __init__(self, component: TorchComponent, layout: BankLayout, slots: int = DEFAULT_SLOTS) -> None:
        if component.name != FLUX_TRANSFORMER:
            raise ValueError(f"the adapter branch is the transformer's, not {component.name}'s")
        self.component, self.layout = component, layout
        self.bank = TorchAdapterBank(layout, slots, component.device, component.dtype)
        self.step_inputs = list(component.input_names)
        self.output_name = component.output_name
        self._lock = threading.Lock()
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None
        """The running step's slot (B,) and scale (B, 1, 1) per row; None: no branch."""
        self._hooks = [m.register_forward_hook(self._branch(parts)) for m, parts in self._targets().values()]
        log.info(
            "adapter branch on %d layers of %d modules: rank %d, %s bank, %d slots, %.1f MB on %s",
            len(layout.layers),
            len(self._hooks),
            layout.rank,
            layout.layout,
            slots,
            self.bank.nbytes / 1e6,
            component.device,
        )

    def _targets(self) -> dict[int, tuple[torch.nn.Module, list[_Part]]]:
        """Each module a bank layer lands on (fused q/k/v: three layers on one), with its parts."""
        out: dict[int, tuple[torch.nn.Module, list[_Part]]] = {}
        grouped = self.layout.layout == "grouped"
        for path in self.layout.layers:
            target = linear_target(self.component.module, path)
            group, index = self.layout.locate(path)
            part = _Part(group.a_input, group.b_input, index if grouped else None, len(group.layers), target.rows)
            out.setdefault(id(target.layer), (target.layer, []))[1].append(part)
        for _, parts in out.values():
            parts.sort(key=lambda p: p.columns.start)
        return out

    def _delta(self, part: _Part, x: torch.Tensor, slot: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        a_bank, b_bank = self.bank.tensors[part.a_input], self.bank.tensors[part.b_input]
        if part.index is None:
            rows = slot
        else:  # row `slot * L + index` of the bank flattened to (S * L, in, R), as the CPU graph reads it
            a_bank, b_bank = a_bank.flatten(0, 1), b_bank.flatten(0, 1)
            rows = slot * part.layers + part.index
        a = a_bank.index_select(0, rows)  # (B, in, R)
        b = b_bank.index_select(0, rows)  # (B, R, out)
        # The scale multiplies the (B, T, R) product: R columns instead of `out`.
        return torch.bmm(torch.bmm(x, a) * scale, b)

    def _branch(self, parts: list[_Part]):
        def add_branch(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            if self._rows is None:  # no adapter in this step, or a call from outside `run`
                return out
            slot, scale = self._rows
            x = args[0]
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            pieces, at = [], 0
            for part in parts:  # column order; a fused layer's thirds without a branch add zeros
                if part.columns.start > at:
                    pieces.append(flat.new_zeros(flat.shape[0], flat.shape[1], part.columns.start - at))
                pieces.append(self._delta(part, flat, slot, scale))
                at = part.columns.stop
            if at < out.shape[-1]:
                pieces.append(flat.new_zeros(flat.shape[0], flat.shape[1], out.shape[-1] - at))
            delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
            return out + delta.reshape(out.shape)

        return add_branch

    def load(self, slot: int, adapter: AdapterWeights) -> None:
        with self._lock:
            self.bank.put(slot, adapter)

    def unload(self, slot: int) -> None:
        with self._lock:
            self.bank.clear(slot)

    def run(self, inputs: Mapping[str, np.ndarray], slots: Iterable[int], scales: Iterable[float]) -> np.ndarray:
        """One transformer step: `inputs` by contract name (batch-major), a slot and a scale per row."""
        slot, scale = row_slots_and_scales(slots, scales, inputs["hidden_states"].shape[0], self.bank.slots)
        active = bool(((slot != 0) & (scale != 0)).any())
        device, dtype = self.component.device, self.component.dtype
        with self._lock:
            if active:
                self._rows = (
                    torch.from_numpy(slot).to(device),
                    torch.from_numpy(scale).to(device, dtype).reshape(-1, 1, 1),
                )
            try:
                return self.component(inputs)
            finally:
                self._rows = None

    def remove(self) -> None:
        """Take the hooks off the transformer (it computes the plain model again)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def adapter_runner(component: TorchComponent, version_dir: Path, parameters: Mapping[str, str]) -> AdapterRunner | None:
    """The transformer's adapter runner when its version folder holds the bank layout, else None.
    `parameters`: the model config's (ADAPTER_SLOTS_PARAMETER: bank slots, slot 0 included)."""
    version_dir = Path(version_dir)
    if component.name != FLUX_TRANSFORMER or not BankLayout.exists(version_dir):
        return None
    slots = int(parameters.get(ADAPTER_SLOTS_PARAMETER) or DEFAULT_SLOTS)
    session = TorchAdapterSession(component, BankLayout.load(version_dir), slots)
    # version_dir is <repository>/<model>/<version>; the store lies beside the repository.
    return AdapterRunner(session, adapters_dir(version_dir.parent.parent))
