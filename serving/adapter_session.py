"""The adapter-branch transformer graph on ONNX Runtime, its bank bound once (issue 27).

The graph (export/flux/adapter_bank.py) takes the transformer's inputs, a slot and a scale per
batch row, and the bank (common.adapter_bank) as inputs. The bank arrays are bound through one
IOBinding as OrtValues over the arrays' own memory (no copy per step); they are re-bound only
when a slot changes. A step binds just the transformer's inputs, the per-row slots and scales.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.adapter_bank import DEFAULT_SLOTS, SCALE_INPUT, SLOT_INPUT, AdapterBank, AdapterWeights, BankLayout
from common.ort_session import make_session
from contract.specs import FLUX_IO_NAMES, FLUX_TRANSFORMER


class AdapterSession:
    """An ONNX Runtime session of the branch graph that owns its bank and binds it once.

    One step or slot change at a time (a lock): a slot is never rewritten under a running step."""

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
        present = {i.name for i in self.session.get_inputs()}
        # An exporter may drop an input the graph never reads (guidance without guidance embedding).
        self.step_inputs = [n for n in FLUX_IO_NAMES[FLUX_TRANSFORMER][0] if n in present]
        self.output_name = self.session.get_outputs()[0].name
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
        feeds = {n: np.ascontiguousarray(inputs[n], dtype=np.float32) for n in self.step_inputs}
        feeds |= {SLOT_INPUT: slot, SCALE_INPUT: scale}
        with self._lock:
            for name, arr in feeds.items():
                self._binding.bind_cpu_input(name, arr)
            self._binding.bind_output(self.output_name)
            self.session.run_with_iobinding(self._binding)
            return self._binding.copy_outputs_to_cpu()[0]
