"""Apply a LoRA to an exported ONNX model by rewriting only the weights it changes.

`W' = W + scale * (B @ A)` for each layer the LoRA adapts, computed exactly as PEFT fuses it
(`(B @ A) * scaling`, scaling = lora_scale * alpha / rank), then written in the layout of the
initializer the weight map names (transposed for MatMul, a block of rows/columns when fused).
The patched export is a folder like a full export: `model.onnx`, `weight_map.json` and every
unchanged `weights/*` file are hard links to the base export; only the changed tensors are new
files. A patch always starts from the base export (the LoRA-free one), never from a previously
patched model, so patching A then B gives exactly B. When the base serves int8
(export.flux.transformer_precision), the fp32 result is requantized and only the int8 graph's
changed tensors are written (export.flux.int8_patch).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from common.adapter_bank import BANK_FILE
from export.flux.lora_deltas import LayerDelta, NotPatchable, layer_deltas, load_lora_state  # noqa: F401 (their old home)
from export.flux.settings import EXPORT_MARKER
from export.flux.transformer_precision import INT8_DIR, PRECISION_FILE, served_dir
from export.flux.weight_map import Binding, WeightMap

log = logging.getLogger(__name__)

_TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.DOUBLE: torch.float64,
}


@dataclass(frozen=True)
class PatchReport:
    layers: int
    changed_tensors: int
    changed_bytes: int
    """Size of the tensors written: the only new bytes on disk."""
    linked_files: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "patched_layers": self.layers,
            "changed_tensors": self.changed_tensors,
            "changed_bytes": self.changed_bytes,
            "linked_files": self.linked_files,
            "patch_seconds": round(self.seconds, 3),
        }


def _read(model_dir: Path, b: Binding) -> torch.Tensor:
    data = bytearray((model_dir / b.location).read_bytes())
    return torch.frombuffer(data, dtype=_TORCH_DTYPES[b.dtype]).reshape(b.shape)


def _resolve(path: str, layers: dict[str, tuple[Binding, ...]]) -> str:
    """CLIP LoRAs name layers `text_model.encoder...`; transformers 5's CLIPTextModel dropped the
    `text_model` wrapper and its loader strips that prefix, so the map knows `encoder...`."""
    if path not in layers and path.startswith("text_model.") and path[len("text_model.") :] in layers:
        return path[len("text_model.") :]
    return path


def patched_tensors(
    base_dir: Path, weight_map: WeightMap, deltas: dict[str, LayerDelta]
) -> dict[str, tuple[Binding, torch.Tensor]]:
    """initializer name -> (binding, new value) for every initializer the deltas touch."""
    deltas = {_resolve(p, weight_map.layers): d for p, d in deltas.items()}
    unknown = sorted(set(deltas) - set(weight_map.layers))
    if unknown:
        raise NotPatchable(f"LoRA adapts layers the weight map does not cover: {unknown[:5]}")
    by_init: dict[str, list[tuple[Binding, torch.Tensor]]] = defaultdict(list)
    for path, delta in deltas.items():
        d = delta.weight_delta()
        for b in weight_map.layers[path]:
            if tuple(d.shape) != (b.stop - b.start, b.shape[0] if b.transposed else b.shape[1]):
                raise NotPatchable(
                    f"{path}: LoRA delta {tuple(d.shape)} does not fit initializer {b.initializer} {b.shape}"
                )
            by_init[b.initializer].append((b, d))
    out = {}
    for name, parts in by_init.items():
        base = _read(base_dir, parts[0][0])
        new = base.float().clone()
        for b, d in parts:
            if b.transposed:
                new[:, b.start : b.stop] += d.t()
            else:
                new[b.start : b.stop, :] += d
        out[name] = (parts[0][0], new.to(base.dtype))
    return out


def _int8_files(base_dir: Path, new: dict[str, tuple[Binding, torch.Tensor]]) -> dict[str, bytes]:
    """Relative file in the patched export -> bytes, for the int8 graph (export.flux.int8_patch)."""
    from export.flux.int8_patch import NotRequantizable, patched_int8_files

    fp32_graph = onnx.load(str(base_dir / "model.onnx"), load_external_data=False)
    arrays = {name: value.numpy() for name, (_, value) in new.items()}
    try:
        files = patched_int8_files(base_dir / INT8_DIR, fp32_graph, arrays)
    except NotRequantizable as e:
        raise NotPatchable(str(e)) from e
    return {f"{INT8_DIR}/{rel}": data for rel, data in files.items()}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def patch_export(base_dir: Path, out_dir: Path, deltas: dict[str, LayerDelta]) -> PatchReport:
    """Write the patched export of `base_dir` (model.onnx + weight_map.json + weights/) into
    `out_dir`, which must not exist yet (callers write a completion marker after this)."""
    started = time.monotonic()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    weight_map = WeightMap.load(base_dir)
    new = patched_tensors(base_dir, weight_map, deltas)
    if served_dir(base_dir) != base_dir:
        # int8 is served: only the int8 graph is written (requantized changed tensors), never
        # the fp32 patch, which nothing would read; later patches start from the base's fp32.
        files = _int8_files(base_dir, new)
        keep = {INT8_DIR, PRECISION_FILE, BANK_FILE}  # the adapter branch's layout serves with int8 too
    else:
        files = {b.location: v.contiguous().view(torch.uint8).numpy().tobytes() for b, v in new.values()}
        keep = None
    out_dir.mkdir(parents=True)
    changed_bytes = 0
    for rel, data in files.items():
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / (rel + ".tmp")
        tmp.write_bytes(data)
        tmp.rename(out_dir / rel)  # never rewrite a file in place: others may link it
        changed_bytes += len(data)
    linked = 0
    for src in sorted(p for p in base_dir.rglob("*") if p.is_file()):
        rel = src.relative_to(base_dir).as_posix()
        if rel in files or rel == EXPORT_MARKER or (keep is not None and rel.split("/")[0] not in keep):
            continue
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(src, dst)
        linked += 1
    report = PatchReport(len(deltas), len(files), changed_bytes, linked, time.monotonic() - started)
    log.info(
        "patched %d layers (%d tensors, %.1f MB written, %d files linked) in %.2fs -> %s",
        report.layers,
        report.changed_tensors,
        changed_bytes / 1e6,
        linked,
        report.seconds,
        out_dir,
    )
    return report
