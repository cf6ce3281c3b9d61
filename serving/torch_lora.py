"""A LoRA patched into and out of a running gpu-torch transformer, in place on its device tensors.

On the gpu-torch target the transformer's Triton version holds the base weights only. The LoRA a
pipeline version runs with lives in that `generate` / `generate_stream` version folder
(contract.specs.FUSED_LORA_FILE), and every transformer call names it (request parameter
contract.specs.FUSED_LORA_PARAMETER). Before running a call whose LoRA is not the one applied,
the transformer changes its own weights: W += s_new·B_new·A_new − s_old·B_old·A_old, per layer,
computed in float32 on the weight's device and rounded once into the same storage. Nothing is
reloaded and no second copy of the weights exists, so a LoRA swap costs a few low-rank products
instead of a model load (and compiled code and CUDA graphs, which hold the tensors' addresses,
stay valid). An execution holds the switch's lock from the patch to its last forward, so no
execution sees half a patch; since each call names its own LoRA, a request that started on the old
pipeline version finishes on the old LoRA even while the new version's requests arrive (the
weights switch back and forth at execution boundaries until the old requests are done).

Limits: a switch rounds once per weight (bfloat16: up to half a unit in the last place of that
weight each time), so weights that switched many times drift from a fresh load by a few such
units; fp8 layers are dequantized, patched and requantized per row (one more fp8 rounding per
switch). A component version that carries its own `lora.safetensors` (a CLIP LoRA, or a layout
from before this) keeps adding it at load (serving/torch_components.py).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from common.torch_runtime import LoraFactors, load_lora_factors
from contract.specs import FUSED_LORA_FILE, FUSED_LORA_PARAMETER, fused_lora_source

log = logging.getLogger(__name__)

FUSED_ROWS: dict[str, tuple[str, int]] = {
    "to_q": ("to_qkv", 0),
    "to_k": ("to_qkv", 1),
    "to_v": ("to_qkv", 2),
    "add_q_proj": ("to_added_qkv", 0),
    "add_k_proj": ("to_added_qkv", 1),
    "add_v_proj": ("to_added_qkv", 2),
}
"""A separate projection -> (its fused layer, its third of the rows), as diffusers'
fuse_projections concatenates them: a LoRA of `to_k` patches the middle rows of `to_qkv`."""
BASE = ""
"""The applied LoRA's id when none is applied."""
UNKNOWN = "unknown"
"""The applied LoRA's id while a patch runs, and after one that failed and could not be undone."""
CACHED_LORAS = 2
"""Factor sets kept in memory: the applied one (needed to take it out again) and the last other."""

Out = TypeVar("Out")


@dataclass(frozen=True)
class LinearTarget:
    layer: torch.nn.Module
    """A Linear layer, or one with fp8 weights and per-row `weight_scale` (Fp8Linear)."""
    rows: slice


def _is_linear(layer: object) -> bool:
    return isinstance(layer, torch.nn.Linear) or isinstance(getattr(layer, "weight_scale", None), torch.Tensor)


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def linear_target(module: torch.nn.Module, path: str) -> LinearTarget:
    """Where a LoRA of layer `path` lands: that layer, or its rows of the fused q/k/v layer (also
    where the adapter branch of that layer adds, serving/torch_adapters.py)."""
    layer = _submodule(module, path)
    if layer is None:
        parent, _, leaf = path.rpartition(".")
        fused_name, third = FUSED_ROWS.get(leaf, ("", 0))
        fused = _submodule(module, f"{parent}.{fused_name}") if fused_name else None
        if fused is not None and _is_linear(fused):
            rows = int(fused.out_features) // 3
            return LinearTarget(fused, slice(third * rows, (third + 1) * rows))
        raise ValueError(f"no layer {path!r} in {type(module).__name__}")
    if not _is_linear(layer):
        raise ValueError(f"{path!r} is a {type(layer).__name__}, not a Linear layer")
    return LinearTarget(layer, slice(0, int(layer.out_features)))


Part = tuple[slice, torch.Tensor, torch.Tensor, float]
"""Rows of a layer, down (rank, in), up (rows, rank), signed scale."""


def _plan(module: torch.nn.Module, remove: LoraFactors, add: LoraFactors) -> list[tuple[torch.nn.Module, list[Part]]]:
    """Every layer the patch changes with its parts, all checked before anything is changed."""
    plan: dict[int, tuple[torch.nn.Module, list[Part]]] = {}
    for sign, factors in ((-1.0, remove), (1.0, add)):
        for path, (down, up, scale) in factors.items():
            t = linear_target(module, path)
            rows = t.rows.stop - t.rows.start
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise ValueError(f"{path}: LoRA factors {tuple(up.shape)} x {tuple(down.shape)} do not chain")
            if (up.shape[0], down.shape[1]) != (rows, int(t.layer.in_features)):
                raise ValueError(
                    f"{path}: LoRA delta {(up.shape[0], down.shape[1])} does not fit weight {(rows, t.layer.in_features)}"
                )
            plan.setdefault(id(t.layer), (t.layer, []))[1].append((t.rows, down, up, sign * scale))
    return list(plan.values())


def _apply(layer: torch.nn.Module, parts: list[Part]) -> None:
    """One layer: the parts' deltas summed in float32, added to its rows, rounded once."""
    weight = layer.weight
    deltas: dict[tuple[int, int], torch.Tensor] = {}
    for rows, down, up, scale in parts:
        # As PEFT computes a Linear layer's delta: (B @ A) * scaling.
        d = (up.to(weight.device, torch.float32) @ down.to(weight.device, torch.float32)) * scale
        key = (rows.start, rows.stop)
        deltas[key] = deltas[key] + d if key in deltas else d
    for (start, stop), d in deltas.items():
        view = weight[start:stop]
        scales = getattr(layer, "weight_scale", None)
        if scales is None:
            view.copy_((view.float() + d).to(weight.dtype))
            continue
        # fp8 rows with one scale each ((1, out), as torch._scaled_mm takes it): requantize the rows.
        fmax = float(torch.finfo(weight.dtype).max)
        rows = view.float() * scales[0, start:stop].unsqueeze(1) + d
        new = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / fmax
        view.copy_((rows / new).clamp(-fmax, fmax).to(weight.dtype))
        scales[0, start:stop] = new.squeeze(1)


class PatchError(RuntimeError):
    """A patch failed part-way and was undone: the weights hold what they held before."""


@torch.no_grad()
def _apply_plan(plan: list[tuple[torch.nn.Module, list[Part]]]) -> None:
    done: list[tuple[torch.nn.Module, list[Part]]] = []
    try:
        for layer, parts in plan:
            _apply(layer, parts)
            done.append((layer, parts))
    except Exception as e:  # e.g. out of device memory for one delta: undo what was changed
        for layer, parts in reversed(done):
            _apply(layer, [(rows, down, up, -scale) for rows, down, up, scale in parts])
        raise PatchError(f"patching stopped after {len(done)} of {len(plan)} layers and was undone: {e}") from e


def patch_lora(module: torch.nn.Module, remove: LoraFactors | None = None, add: LoraFactors | None = None) -> int:
    """Take `remove` out of `module`'s weights and put `add` in, in place (the same tensors, the
    same storage). Every layer is checked before any changes, so a bad LoRA changes nothing.
    Returns the number of layers changed."""
    plan = _plan(module, remove or {}, add or {})
    _apply_plan(plan)
    return len(plan)


def add_lora(module: torch.nn.Module, factors: LoraFactors, sign: float = 1.0) -> int:
    """W += sign · scale · up @ down for every layer (sign -1 takes a LoRA out, up to rounding)."""
    return patch_lora(module, add=factors) if sign > 0 else patch_lora(module, remove=factors)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LoraSwitch:
    """The LoRA a module's weights hold now, and the one way to change it (under `lock`)."""

    def __init__(self, module: torch.nn.Module, repository: Path, name: str = "flux_transformer") -> None:
        self.module, self.repository, self.name = module, Path(repository), name
        self.lock = threading.Lock()
        self.applied = BASE
        """sha256 of the applied LoRA file, or BASE."""
        self.patches = 0
        """Switches since load: each rounds the patched weights once (the drift limit above)."""
        self._factors: OrderedDict[str, LoraFactors] = OrderedDict()
        self._ids: dict[tuple[int, int, int, int], str] = {}

    def path(self, source: object) -> Path | None:
        """The LoRA file a FUSED_LORA_PARAMETER value names (None: the base weights)."""
        parsed = fused_lora_source(source)
        return None if parsed is None else self.repository / parsed[0] / str(parsed[1]) / FUSED_LORA_FILE

    def identify(self, source: object) -> str:
        """The id (file sha256) of the LoRA `source` names, its factors read on first use.
        ValueError when the source is malformed or its pipeline version holds no LoRA."""
        path = self.path(source)
        if path is None:
            return BASE
        try:
            st = path.stat()
        except OSError as e:
            raise ValueError(f"{FUSED_LORA_PARAMETER}={source!r}: that version holds no transformer LoRA") from e
        # Version files are never rewritten in place, so a file's identity stands for its bytes;
        # generate/N and generate_stream/N hard-link one file, so they never count as two LoRAs.
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        lora_id = self._ids.get(key)
        if lora_id is None or lora_id not in self._factors:
            lora_id = _sha256(path)
            if lora_id not in self._factors:
                self._factors[lora_id] = load_lora_factors(path)
            self._ids[key] = lora_id
        self._factors.move_to_end(lora_id)
        return lora_id

    def switch(self, lora_id: str) -> bool:
        """Make the weights hold LoRA `lora_id` (an id from `identify`, or BASE); hold `lock`."""
        if lora_id == self.applied:
            return False
        if self.applied == UNKNOWN:
            raise RuntimeError(f"{self.name}: a failed patch left the weights unknown; reload the model")
        started = time.perf_counter()
        remove = self._factors.get(self.applied) if self.applied != BASE else None
        plan = _plan(self.module, remove or {}, self._factors[lora_id] if lora_id != BASE else {})
        previous, self.applied = self.applied, UNKNOWN
        try:
            _apply_plan(plan)
        except PatchError:
            self.applied = previous
            raise
        layers = len(plan)
        self.applied = lora_id
        self.patches += 1
        log.info(
            "%s: LoRA %s -> %s patched in place (%d layers, %.3fs, switch %d since load)",
            self.name,
            previous[:12] or "base",
            lora_id[:12] or "base",
            layers,
            time.perf_counter() - started,
            self.patches,
        )
        return True

    def _trim(self) -> None:
        """Forget all factors but the applied LoRA's and the most recently used other's."""
        keep = {self.applied}
        for other in reversed(self._factors):  # most recently used first
            if len(keep) >= CACHED_LORAS:
                break
            keep.add(other)
        for stale in [k for k in self._factors if k not in keep]:
            del self._factors[stale]

    def use(self, source: object) -> bool:
        """Switch to the LoRA `source` names (an in-process caller's way; a served model's is `run`)."""
        with self.lock:
            changed = self.switch(self.identify(source))
            self._trim()
        return changed

    def run(
        self, run: Callable[[list[dict]], list[Out]], feeds: Sequence[dict], sources: Sequence[object]
    ) -> list[Out | Exception]:
        """One execution: each group of requests sharing a LoRA runs under it (the applied LoRA's
        group first, so a batch mixing two pipeline versions switches once, not twice). A bad
        source or a failed group fails its own requests only."""
        results: list[Out | Exception | None] = [None] * len(feeds)
        with self.lock:
            groups: dict[str, list[int]] = {}
            for i, source in enumerate(sources):
                try:
                    groups.setdefault(self.identify(source), []).append(i)
                except Exception as e:  # malformed source, missing or unreadable file: that request only
                    results[i] = e
            for lora_id in sorted(groups, key=lambda k: k != self.applied):
                idx = groups[lora_id]
                try:
                    self.switch(lora_id)
                    outs: list[Out | Exception] = list(run([feeds[i] for i in idx]))
                except Exception as e:  # a failed group fails its requests, never the others
                    log.exception("%s: a group of %d requests failed", self.name, len(idx))
                    outs = [e] * len(idx)
                for i, out in zip(idx, outs):
                    results[i] = out
            self._trim()
        return [r if r is not None else RuntimeError("not run") for r in results]


def run_without_lora(
    run: Callable[[list[dict]], list[Out]], feeds: Sequence[dict], sources: Sequence[object], name: str
) -> list[Out | Exception]:
    """A component that takes no LoRA: requests naming one are refused, the rest run as one batch."""
    results: list[Out | Exception | None] = [None] * len(feeds)
    plain = []
    for i, source in enumerate(sources):
        try:
            if fused_lora_source(source) is not None:
                raise ValueError(f"{name} takes no {FUSED_LORA_PARAMETER}")
            plain.append(i)
        except ValueError as e:
            results[i] = e
    if plain:
        try:
            outs: list[Out | Exception] = list(run([feeds[i] for i in plain]))
        except Exception as e:
            log.exception("%s failed", name)
            outs = [e] * len(plain)
        for i, out in zip(plain, outs):
            results[i] = out
    return [r if r is not None else RuntimeError("not run") for r in results]
