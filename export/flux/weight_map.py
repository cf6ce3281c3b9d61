"""Where each Linear layer's weight lives in an exported ONNX graph, and per-tensor weight files.

A LoRA changes only `W <- W + scale * (B @ A)` of some Linear layers; the graph never changes.
To patch an exported model instead of re-exporting it we need, per layer, the ONNX initializer(s)
holding its weight and in which layout. The dynamo exporter does not keep parameter names for
everything: it constant-folds `Transpose(W)` into anonymous initializers (`val_161`, shape
[in, out]) for MatMul, keeps `W` itself for Gemm(transB=1), and an optimizer may fuse q/k/v into
one initializer. So the map is built from *content*, not names: an initializer belongs to a layer
when its bytes equal W, or W transposed, or W sits as a block of rows (columns) in a larger one.
Content matching is a proof with random or trained weights; an initializer matched by more than
one layer (identical weights) is left out, so patching can never write one layer's delta into
another's weights.

Weights are stored as ONNX external data with one file per tensor under `weights/`: a new
version then shares every unchanged tensor by hard link and writes only the changed ones (one
`.data` file with offsets would have to be copied whole, or rewritten in place, which would
corrupt every version sharing it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import external_data_helper, numpy_helper

log = logging.getLogger(__name__)

WEIGHTS_DIR = "weights"
"""External-data folder beside model.onnx, one file per initializer."""
WEIGHT_MAP_FILE = "weight_map.json"
WEIGHT_MAP_FORMAT = "fluxserve-weight-map/1"
INLINE_BELOW_BYTES = 1024
"""Tiny constants (shapes, scalars) stay inside model.onnx; everything else gets its own file."""


@dataclass(frozen=True)
class Binding:
    """One initializer holding (part of) a layer's weight.

    The initializer has shape `shape`. Not transposed: rows [start, stop) are the layer's
    (out, in) weight. Transposed: columns [start, stop) are its transpose (in, out), the layout
    MatMul uses. start/stop cover the whole axis unless q/k/v (or more) were fused.
    """

    initializer: str
    location: str
    """File of the initializer relative to the model folder."""
    shape: tuple[int, ...]
    dtype: int
    """onnx.TensorProto data type."""
    transposed: bool
    start: int
    stop: int

    @classmethod
    def from_json(cls, d: dict) -> Binding:
        return cls(**{**d, "shape": tuple(d["shape"])})


@dataclass(frozen=True)
class WeightMap:
    """Layer path (inside the exported module, e.g. `transformer_blocks.0.attn.to_q`) -> bindings."""

    module_prefix: str
    """Prefix of parameter names in the graph (the export wrapper's attribute, e.g. `transformer.`)."""
    layers: dict[str, tuple[Binding, ...]]
    unmapped: tuple[str, ...]
    """Linear layers whose weight was not found, or shares its initializer with another layer."""

    def to_json(self) -> dict:
        return {
            "format": WEIGHT_MAP_FORMAT,
            "module_prefix": self.module_prefix,
            "layers": {k: [asdict(b) for b in v] for k, v in sorted(self.layers.items())},
            "unmapped": list(self.unmapped),
        }

    @classmethod
    def from_json(cls, d: dict) -> WeightMap:
        if d.get("format") != WEIGHT_MAP_FORMAT:
            raise ValueError(f"unknown weight map format {d.get('format')!r}")
        return cls(
            d["module_prefix"],
            {k: tuple(Binding.from_json(b) for b in v) for k, v in d["layers"].items()},
            tuple(d["unmapped"]),
        )

    def save(self, folder: Path) -> Path:
        path = Path(folder) / WEIGHT_MAP_FILE
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, folder: Path) -> WeightMap:
        return cls.from_json(json.loads((Path(folder) / WEIGHT_MAP_FILE).read_text()))


# ----------------------------------------------------------------------------- external data


def _file_name(tensor_name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", tensor_name).lstrip(".") or "tensor"
    name, i = base, 1
    while name.lower() in taken:  # case-insensitive file systems
        i += 1
        name = f"{base}_{i}"
    taken.add(name.lower())
    return name


def _point_to(tensor: onnx.TensorProto, location: str, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _tensor_bytes(tensor: onnx.TensorProto, source_dir: Path | None) -> bytes:
    """The tensor's raw little-endian bytes, read from its external file range if it has one
    (one tensor at a time: a 24 GB .data file is never loaded whole)."""
    if external_data_helper.uses_external_data(tensor):
        if source_dir is None:
            raise ValueError(f"{tensor.name}: external data needs the model's folder")
        info = external_data_helper.ExternalDataInfo(tensor)
        with (Path(source_dir) / info.location).open("rb") as fh:
            fh.seek(info.offset or 0)
            return fh.read(info.length) if info.length else fh.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def save_per_tensor(
    model: onnx.ModelProto,
    path: Path,
    inline_below: int = INLINE_BELOW_BYTES,
    source_dir: Path | None = None,
    always_external: Callable[[str], bool] | None = None,
) -> None:
    """Save `model` to `path` with each initializer of at least `inline_below` bytes (or named
    by `always_external`) in its own file `weights/<sanitised name>`. Initializers still in
    external files are read from `source_dir` one by one (the exporter's single `.data` file for
    models over 2 GB)."""
    path = Path(path)
    (path.parent / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for tensor in model.graph.initializer:
        data = _tensor_bytes(tensor, source_dir)
        if len(data) >= inline_below or (always_external is not None and always_external(tensor.name)):
            location = f"{WEIGHTS_DIR}/{_file_name(tensor.name, taken)}"
            (path.parent / location).write_bytes(data)
            _point_to(tensor, location, len(data))
        else:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = data
    onnx.save_model(model, str(path))


def initializer_locations(model: onnx.ModelProto) -> dict[str, str]:
    """Initializer name -> external file (relative), for initializers stored outside the graph."""
    out = {}
    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            out[tensor.name] = external_data_helper.ExternalDataInfo(tensor).location
    return out


def read_initializer(model_dir: Path, binding: Binding) -> np.ndarray:
    """The initializer's array, read from its own file (no protobuf parsing)."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(binding.dtype)
    return np.fromfile(Path(model_dir) / binding.location, dtype=dtype).reshape(binding.shape)


# ----------------------------------------------------------------------------- the map


def _torch_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _block_offsets(big: np.ndarray, part: np.ndarray) -> list[int]:
    """Row offsets where `part` (k, n) occurs as a block of rows in `big` (m, n), m > k."""
    if big.ndim != 2 or part.ndim != 2 or big.shape[1] != part.shape[1] or big.shape[0] <= part.shape[0]:
        return []
    candidates = np.flatnonzero((big[: big.shape[0] - part.shape[0] + 1] == part[0]).all(axis=1))
    return [int(o) for o in candidates if np.array_equal(big[o : o + part.shape[0]], part)]


def build_weight_map(model: onnx.ModelProto, model_dir: Path, module: torch.nn.Module, module_prefix: str) -> WeightMap:
    """Map every nn.Linear of `module` (the exported module's inner model, whose parameters the
    graph names `module_prefix + path`) to the initializers of `model` (saved in `model_dir`,
    weights external) that hold its weight; see the module docstring."""
    locations = initializer_locations(model)
    tensors = {t.name: t for t in model.graph.initializer if t.name in locations}

    cache: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = numpy_helper.to_array(tensors[name], base_dir=str(model_dir)).astype(np.float32)
        return cache[name]

    by_key: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        raw = (Path(model_dir) / locations[name]).read_bytes()
        by_key.setdefault((tuple(t.dims), t.data_type, _digest(raw)), []).append(name)

    found: dict[str, list[Binding]] = {}
    owners: dict[str, set[str]] = {}
    linears = {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    missing: list[str] = []
    for path, linear in linears.items():
        w = linear.weight
        dtype = (
            onnx.helper.np_dtype_to_tensor_dtype(np.dtype(str(w.dtype).removeprefix("torch.")))
            if w.dtype != torch.bfloat16
            else onnx.TensorProto.BFLOAT16
        )
        out_f, in_f = w.shape
        hits: list[Binding] = []
        for transposed, tensor in ((False, w), (True, w.t())):
            key = (tuple(tensor.shape), dtype, _digest(_torch_bytes(tensor)))
            for name in by_key.get(key, []):
                hits.append(Binding(name, locations[name], tuple(tensors[name].dims), dtype, transposed, 0, out_f))
        if not hits:
            missing.append(path)
        found[path] = hits
        for b in hits:
            owners.setdefault(b.initializer, set()).add(path)

    # Fused layouts (q/k/v in one initializer): only among 2-D initializers no layer owns whole.
    if missing:
        leftovers = [n for n, t in tensors.items() if len(t.dims) == 2 and n not in owners]
        for path in list(missing):
            w = linears[path].weight.detach().float().numpy()
            for name in leftovers:
                big = array(name)
                for transposed, b, part in ((False, big, w), (True, big.T, w)):
                    for offset in _block_offsets(b, part):
                        t = tensors[name]
                        found[path].append(
                            Binding(
                                name,
                                locations[name],
                                tuple(t.dims),
                                t.data_type,
                                transposed,
                                offset,
                                offset + w.shape[0],
                            )
                        )
                        owners.setdefault(name, set()).add(path)
            if found[path]:
                missing.remove(path)

    ambiguous = set()
    for path, hits in found.items():
        for b in hits:
            rows_taken = [
                x
                for p in owners[b.initializer]
                if p != path
                for x in found[p]
                if x.initializer == b.initializer and x.start < b.stop and b.start < x.stop
            ]
            if rows_taken:
                ambiguous.add(path)
    layers = {p: tuple(h) for p, h in found.items() if h and p not in ambiguous}
    unmapped = tuple(sorted(set(missing) | ambiguous))
    if unmapped:
        log.info(
            "weight map: %d Linear layers not patchable (%s%s)",
            len(unmapped),
            ", ".join(unmapped[:5]),
            "..." if len(unmapped) > 5 else "",
        )
    return WeightMap(module_prefix, layers, unmapped)


def externalize_and_map(
    path: Path, module: torch.nn.Module, module_prefix: str, required: set[str] | None = None
) -> WeightMap:
    """Rewrite the exported `path` with per-tensor weight files, build its weight map and save it
    beside it. `required` layers (the LoRA targets) must map, else this raises: a base export
    whose weights cannot be located is not one to patch."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    staging = path.parent / ".per-tensor"
    shutil.rmtree(staging, ignore_errors=True)
    save_per_tensor(model, staging / path.name, source_dir=path.parent)
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    (staging / WEIGHTS_DIR).rename(path.parent / WEIGHTS_DIR)
    (staging / path.name).rename(path)
    staging.rmdir()
    graph_only = onnx.load(str(path), load_external_data=False)
    weight_map = build_weight_map(graph_only, path.parent, module, module_prefix)
    missing = sorted((required or set()) - set(weight_map.layers))
    if missing:
        raise RuntimeError(f"weight map: no unique initializer for LoRA target layers {missing[:5]}")
    weight_map.save(path.parent)
    log.info(
        "weight map: %d Linear layers mapped (%d unmapped) in %s",
        len(weight_map.layers),
        len(weight_map.unmapped),
        path.parent,
    )
    return weight_map
