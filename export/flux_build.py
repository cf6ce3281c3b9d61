"""FLUX's artifacts for Triton: fuse (or patch in) the LoRA, export the components, stage the
pipeline's assets.

`build_flux` makes the files, provenance and deployment of each component (`flux_text_encoder`,
`flux_text_encoder_2`, `flux_transformer`, `flux_vae_decoder`), reusing finished exports;
`staged_pipeline`, `generate_deployment` and `generate_version_files` make what `flux_prepare`,
`generate` and `generate_stream` ship. Choosing version numbers, writing them into the model
repository and loading them into Triton is publish.flux's part.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.flux_assets import copy_loop_assets, read_max_sequence_length
from contract.cost import CPU_HOST_MEMORY_SHARE
from contract.specs import (
    ADAPTER_SLOTS_PARAMETER,
    ATTENTION_HEADS_PARAMETER,
    FLUX_ADAPTER_TRANSFORMER,
    FLUX_COMPONENTS,
    FLUX_TEXT_ENCODER,
    FLUX_TEXT_ENCODER_2,
    FLUX_TRANSFORMER,
    FLUX_VAE_DECODER,
    HOST_MEMORY_SHARE_PARAMETER,
    TEXT_TOKENS_PARAMETER,
    TRIGGER_PARAMETER,
)
from export.deployments import ExportSettings, flux_deployments
from export.fingerprints import fingerprint, sha256_file
from export.flux.settings import EXPORT_MARKER, FluxSettings
from export.triton_config import TORCH_TARGET, Deployment, Target

if TYPE_CHECKING:
    from export.torch_target import TorchTargetSettings

log = logging.getLogger(__name__)

PATCH_PREFIXES = {FLUX_TRANSFORMER: "transformer.", FLUX_TEXT_ENCODER: "text_encoder."}
"""Components a LoRA can be patched into, with the key prefix of their LoRA weights."""

TRANSFORMER_PRECISION = "transformer_precision"
"""Provenance key: the precision requested for the transformer (auto / fp32 / int8)."""
ADAPTER_BRANCH = "adapter_branch"
"""Provenance key: the transformer's adapter branch (issue 27; adapter_branch()), absent without one."""

LARGE_FILE_BYTES = 256 << 20
"""Files above this are fingerprinted by size and mtime: hashing FLUX.1-dev's 24 GB each run is waste."""


def default_checkpoint(settings: FluxSettings | None = None) -> Path | str:
    """The configured base model, or the local random-weight build (built on first use)."""
    s = settings or FluxSettings()
    if s.base_model:
        return s.base_model
    from export.flux.checkpoint import build_local_flux

    return build_local_flux(s.local_checkpoint_dir, s.local_size, s.local_seed)


def default_lora(settings: FluxSettings | None = None) -> Path | str:
    s = settings or FluxSettings()
    if s.lora:
        return s.lora
    from export.flux.lora import build_local_lora

    return build_local_lora(
        Path(default_checkpoint(s)), s.local_lora_dir, seed=s.local_seed, trigger_word=s.trigger_word
    )


def source_fingerprint(path: str | Path) -> dict[str, str]:
    """Content identity of a local checkpoint/LoRA (hub ids are identified by name)."""
    p = Path(path)
    if not p.exists():
        return {"hub_id": str(path)}
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    out = {}
    for f in files:
        rel = f.name if p.is_file() else str(f.relative_to(p))
        st = f.stat()
        out[rel] = f"size={st.st_size},mtime={st.st_mtime_ns}" if st.st_size > LARGE_FILE_BYTES else sha256_file(f)
    return out


def base_transformer_fingerprint(checkpoint: str | Path) -> str:
    """The identity of a checkpoint's base transformer (its weights and config, as
    source_fingerprint sees them): what an adapter must have been trained on to be served with
    it (common.adapter_bank.BankLayout.base_fingerprint). A hub id is identified by name."""
    return _base_fingerprint(source_fingerprint(checkpoint))


def _base_fingerprint(checkpoint_files: Mapping[str, str]) -> str:
    transformer = {k: v for k, v in checkpoint_files.items() if k.startswith("transformer/")}
    return fingerprint({"transformer": transformer or dict(checkpoint_files)})


def adapter_branch(
    settings: FluxSettings, target: Target, checkpoint_files: Mapping[str, str]
) -> dict[str, Any] | None:
    """The transformer's adapter branch as built for `target` (provenance key ADAPTER_BRANCH), or
    None: the CPU (graph) and gpu-torch (hooks, serving/torch_adapters.py) targets serve it when
    settings.adapter_branch; the TensorRT target keeps the plain graph."""
    if not settings.adapter_branch or target not in ("cpu", TORCH_TARGET):
        return None
    from common.adapter_bank import BANK_FORMAT

    return {
        "format": BANK_FORMAT,
        "rank": settings.adapter_rank,
        "layout": settings.adapter_layout,
        "base_fingerprint": _base_fingerprint(checkpoint_files),
    }


def _component_files(onnx_dir: Path, name: str) -> dict[str, Path]:
    from common.adapter_bank import BANK_FILE
    from export.flux.transformer_precision import PRECISION_FILE, served_dir
    from export.flux.weight_map import WEIGHT_MAP_FILE, WEIGHTS_DIR

    export = onnx_dir / name
    folder = served_dir(export)  # the int8 graph when the transformer's precision choice says so
    files = {"model.onnx": folder / "model.onnx"}
    if (export / PRECISION_FILE).exists():
        files[PRECISION_FILE] = export / PRECISION_FILE
    if (folder / "model.onnx.data").exists():  # external weights; the .onnx refers to this name
        files["model.onnx.data"] = folder / "model.onnx.data"
    # Per-tensor weights, one entry each so publish hard-links every file: a patched version
    # then shares all unchanged tensors with the versions before it.
    for f in sorted((folder / WEIGHTS_DIR).glob("*")):
        files[f"{WEIGHTS_DIR}/{f.name}"] = f
    if (folder / WEIGHT_MAP_FILE).exists():  # the fp32 graph's map: not shipped beside int8
        files[WEIGHT_MAP_FILE] = folder / WEIGHT_MAP_FILE
    if (export / BANK_FILE).exists():  # the adapter branch's layout (the same for fp32 and int8)
        files[BANK_FILE] = export / BANK_FILE
    return files


def component_provenance(provenance: dict[str, Any], lora_targets: frozenset[str]) -> dict[str, dict[str, Any]]:
    """What each component's weights depend on. A FLUX LoRA changes the transformer and, when it
    has text-encoder keys, CLIP; T5 and the VAE only ever come from the checkpoint. Re-exporting a
    new LoRA therefore rebuilds (and Triton reloads) only what it changed: for FLUX.1-dev that
    spares the 9 GB T5-XXL export and load on every swap."""
    from export.flux.weight_map import WEIGHT_MAP_FORMAT

    base = {k: provenance[k] for k in ("checkpoint", "checkpoint_files", "onnx_opset")}
    # Patchable components carry their weight layout: an export from before per-tensor weights
    # has no weight map, so it must not be reused as the base of a patch.
    patchable = {**base, "onnx_layout": WEIGHT_MAP_FORMAT}
    with_lora = {**patchable, **{k: provenance[k] for k in ("lora", "lora_files", "lora_scale")}}
    transformer = with_lora if "transformer" in lora_targets else patchable
    return {
        FLUX_TEXT_ENCODER: with_lora if "text_encoder" in lora_targets else patchable,
        FLUX_TEXT_ENCODER_2: base,
        # The precision requested (export.flux.transformer_precision): an fp32-only export is not
        # the base of an int8 one. Absent = fp32, the layout before precisions existed.
        FLUX_TRANSFORMER: {
            **transformer,
            **_precision_provenance(provenance.get(TRANSFORMER_PRECISION, "fp32")),
            # The branch graph is another graph: neither the base of a plain patch nor reused as one.
            **({ADAPTER_BRANCH: provenance[ADAPTER_BRANCH]} if provenance.get(ADAPTER_BRANCH) else {}),
        },
        FLUX_VAE_DECODER: base,
    }


def _precision_provenance(precision: str) -> dict[str, str]:
    from export.flux.transformer_precision import INT8_RECIPE

    return {TRANSFORMER_PRECISION: precision, **({"int8_recipe": INT8_RECIPE} if precision != "fp32" else {})}


def _export_fused(
    checkpoint: str | Path,
    lora: str | Path | None,
    lora_scale: float,
    todo: dict[str, Path],
    settings: FluxSettings,
    progress: Callable[[str, object], None] | None,
    precision: str = "fp32",
    branch: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Full export of the components in `todo` (name -> folder) from the LoRA-fused pipeline;
    the transformer's precision is chosen as export.flux.transformer_precision says, and with
    `branch` (adapter_branch()) the transformer is the adapter-branch graph."""
    from export.flux.lora import load_pipeline
    from export.flux.onnx_export import export_all

    report: dict[str, Any] = {}
    pipeline = load_pipeline(checkpoint, lora, lora_scale=lora_scale, weight_name=settings.lora_weight_name)
    for name, onnx_dir in todo.items():
        if name == FLUX_TRANSFORMER and branch:
            result = _export_branch(pipeline, onnx_dir, branch, settings, progress)
        else:
            (result,) = export_all(
                pipeline, onnx_dir, progress=progress, opset=settings.onnx_opset, only=[name]
            ).values()
        facts = {
            "method": "export",
            "max_abs_error": result.max_abs_error,
            "export_seconds": round(result.export_seconds, 2),
        }
        if name == FLUX_TRANSFORMER and precision != "fp32":
            from export.flux.transformer_precision import build_and_choose

            folder = _local_folder(checkpoint)
            facts["precision"] = build_and_choose(onnx_dir / name, precision, folder, pipeline).as_dict()
        (onnx_dir / EXPORT_MARKER).write_text(json.dumps(facts, indent=2))  # written last: marks it complete
        report[name] = {**facts, "onnx_dir": str(onnx_dir), "reused": False}
    return report


def _export_branch(
    pipeline: Any,
    onnx_dir: Path,
    branch: Mapping[str, Any],
    settings: FluxSettings,
    progress: Callable[[str, object], None] | None,
) -> Any:
    """The transformer as the adapter-branch graph, in the plain export's folder and layout."""
    from export.flux.adapter_bank import export_adapter_transformer

    if progress is not None:
        progress(FLUX_TRANSFORMER, None)
    result = export_adapter_transformer(
        pipeline.transformer,
        onnx_dir,
        rank=int(branch["rank"]),
        layout=branch["layout"],
        opset=settings.onnx_opset,
        folder=FLUX_TRANSFORMER,
        base_fingerprint=str(branch["base_fingerprint"]),
    )
    if progress is not None:
        progress(FLUX_TRANSFORMER, result)
    return result


def _finished(onnx_dir: Path) -> dict[str, Any] | None:
    marker = onnx_dir / EXPORT_MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def export_onnx(
    checkpoint: str | Path,
    lora: str | Path | None,
    lora_scale: float,
    export_root: Path,
    provenance: dict[str, dict[str, Any]],
    settings: FluxSettings,
    progress: Callable[[str, object], None] | None = None,
    base_provenance: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Export each component into export_root/<component>/<fingerprint of its provenance>/, unless
    that folder already holds a finished export; the fused pipeline is loaded only when needed.

    With `base_provenance` (each component without the LoRA) and settings.weight_patching, a
    component the LoRA changes is made by patching its base export's weights
    (export.flux.weight_patch); the base is exported first if it is missing, once per base.

    Returns {component: {"onnx_dir", "method", "max_abs_error" | patch facts, "reused"}, "total_seconds"}.
    """
    started = time.monotonic()
    report: dict[str, Any] = {}
    todo: dict[str, Path] = {}
    precision = provenance.get(FLUX_TRANSFORMER, {}).get(TRANSFORMER_PRECISION, "fp32")
    branch = provenance.get(FLUX_TRANSFORMER, {}).get(ADAPTER_BRANCH)
    for name, prov in provenance.items():
        onnx_dir = export_root / name / fingerprint(prov)
        if (facts := _finished(onnx_dir)) is not None:
            report[name] = {**facts, "onnx_dir": str(onnx_dir), "reused": True}
            log.info("%s: ONNX export in %s is up to date", name, onnx_dir)
            if progress is not None:
                progress(name, "reused")
        else:
            shutil.rmtree(onnx_dir, ignore_errors=True)  # a half-written export from an interrupted run
            todo[name] = onnx_dir
    patchable = {
        n: d
        for n, d in todo.items()
        if n in PATCH_PREFIXES and base_provenance is not None and base_provenance[n] != provenance[n]
    }
    if lora is not None and settings.weight_patching and patchable:
        assert base_provenance is not None
        base_dirs = {n: export_root / n / fingerprint(base_provenance[n]) for n in patchable}
        missing = {n: d for n, d in base_dirs.items() if _finished(d) is None}
        for d in missing.values():
            shutil.rmtree(d, ignore_errors=True)
        # Components the LoRA leaves alone are base exports too: one LoRA-free pipeline load for all.
        plain = {n: d for n, d in todo.items() if provenance[n] == base_provenance[n]}
        if missing or plain:  # the base of a patch is exported once per base model
            log.info("exporting %s without the LoRA (bases to patch: %s)", sorted({*missing, *plain}), sorted(missing))
            done = _export_fused(checkpoint, None, 1.0, {**missing, **plain}, settings, progress, precision, branch)
            report.update({n: done[n] for n in plain})
        report.update(
            _patch(lora, lora_scale, {n: (base_dirs[n], patchable[n]) for n in patchable}, settings, progress)
        )
        todo = {n: d for n, d in todo.items() if n not in report}
    if todo:
        report.update(_export_fused(checkpoint, lora, lora_scale, todo, settings, progress, precision, branch))
    report["total_seconds"] = round(time.monotonic() - started, 1)
    return report


def _patch(
    lora: str | Path,
    lora_scale: float,
    jobs: dict[str, tuple[Path, Path]],
    settings: FluxSettings,
    progress: Callable[[str, object], None] | None,
) -> dict[str, Any]:
    """Patch each component of `jobs` (name -> (base export, target folder)); components whose
    LoRA keys the weight map cannot express are left out (the caller re-exports them)."""
    from export.flux.weight_patch import NotPatchable, layer_deltas, load_lora_state, patch_export

    report: dict[str, Any] = {}
    state, alphas, metadata = load_lora_state(lora, settings.lora_weight_name)
    for name, (base_dir, onnx_dir) in jobs.items():
        if progress is not None:
            progress(name, None)
        staging = onnx_dir.with_name(f".{onnx_dir.name}.patch-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            deltas = layer_deltas(state, alphas, metadata, PATCH_PREFIXES[name], lora_scale)
            result = patch_export(base_dir / name, staging / name, deltas)
        except (NotPatchable, FileNotFoundError) as e:
            shutil.rmtree(staging, ignore_errors=True)
            log.warning("%s: cannot patch this LoRA in (%s); re-exporting instead", name, e)
            continue
        # Not measured per publish: patched == fused re-export is proven by tests/unit/test_weight_patch.py
        # (<= 1e-5); what is recorded is the base export's own ONNX-vs-PyTorch error.
        base_facts = _finished(base_dir) or {}
        facts = {
            "method": "patch",
            "base_onnx_dir": str(base_dir),
            "max_abs_error": None,
            "base_max_abs_error": base_facts.get("max_abs_error"),
            **result.as_dict(),
            **({"precision": base_facts["precision"]} if "precision" in base_facts else {}),
        }
        (staging / EXPORT_MARKER).write_text(json.dumps(facts, indent=2))
        staging.rename(onnx_dir)
        report[name] = {**facts, "onnx_dir": str(onnx_dir), "reused": False}
        if progress is not None:
            progress(name, "patched")
    return report


ComponentParts = dict[str, tuple[dict[str, Path], dict[str, Any], dict[str, Any]]]
"""Component name -> (files of its new version, its provenance, facts for its manifest)."""


def _onnx_parts(
    checkpoint: str | Path,
    lora: str | Path | None,
    scale: float,
    targets: frozenset[str],
    provenance: dict[str, Any],
    s: FluxSettings,
    export_settings: ExportSettings | None,
    progress: Callable[[str, object], None] | None,
) -> tuple[dict[str, Deployment], ComponentParts, dict[str, Any]]:
    """cpu and gpu targets: the components exported (or patched) to ONNX."""
    per_component = component_provenance(provenance, targets)
    report = export_onnx(
        checkpoint,
        lora,
        scale,
        s.export_root,
        per_component,
        s,
        progress,
        base_provenance=component_provenance(provenance, frozenset()),
    )
    parts: ComponentParts = {
        name: (
            _component_files(Path(report[name]["onnx_dir"]), name),
            per_component[name],
            {
                "parity_max_abs_error": report[name]["max_abs_error"],
                **({"precision": report[name]["precision"]} if "precision" in report[name] else {}),
            },
        )
        for name in FLUX_COMPONENTS
    }
    deps = with_adapter_inputs(flux_deployments(export_settings), bool(provenance.get(ADAPTER_BRANCH)), export_settings)
    return deps, parts, report


def with_adapter_inputs(
    deps: dict[str, Deployment], adapter_branch: bool, export_settings: ExportSettings | None = None
) -> dict[str, Deployment]:
    """`deps` with, when `adapter_branch`, the transformer taking each row's adapter and scale and
    its bank slots: the one rule for that config (the export, and what re-renders it: the GPU check)."""
    if adapter_branch:
        dep = deps[FLUX_TRANSFORMER]
        slots = (export_settings or ExportSettings()).flux_adapter_slots
        deps[FLUX_TRANSFORMER] = replace(
            dep, spec=FLUX_ADAPTER_TRANSFORMER, parameters={**dep.parameters, ADAPTER_SLOTS_PARAMETER: str(slots)}
        )
    return deps


def _torch_parts(
    checkpoint: str | Path,
    lora: str | Path | None,
    scale: float,
    targets: frozenset[str],
    provenance: dict[str, Any],
    s: FluxSettings,
    export_settings: ExportSettings | None,
    torch_settings: TorchTargetSettings | None,
    progress: Callable[[str, object], None] | None,
) -> tuple[dict[str, Deployment], ComponentParts, dict[str, Any], dict[str, Path]]:
    """gpu-torch: the checkpoint's component folders, plus LoRA factors (export.flux.torch_export)
    and, with the adapter branch, the transformer's bank layout; last, the files the pipeline
    versions carry (the transformer LoRA it patches in per call)."""
    from export.flux.torch_export import adapter_bank_file, torch_components
    from export.torch_target import torch_flux_deployments

    builds = torch_components(checkpoint, lora, scale, targets, provenance, s, progress)
    if branch := provenance.get(ADAPTER_BRANCH):  # the same layout as the CPU graph's: the store's adapters fit both
        t = builds[FLUX_TRANSFORMER]
        name, layout = adapter_bank_file(checkpoint, branch, s)
        builds[FLUX_TRANSFORMER] = replace(
            t,
            files={**t.files, name: layout},
            provenance={**t.provenance, ADAPTER_BRANCH: branch},
            report={**t.report, ADAPTER_BRANCH: f"rank {branch['rank']}, {branch['layout']} bank"},
        )
    parts: ComponentParts = {n: (b.files, b.provenance, {"torch": b.report}) for n, b in builds.items()}
    deps = torch_flux_deployments(export_settings, torch_settings)
    deps = with_adapter_inputs(deps, bool(provenance.get(ADAPTER_BRANCH)), export_settings)
    pipeline_files = {rel: src for b in builds.values() for rel, src in b.pipeline_files.items()}
    return deps, parts, {n: b.report for n, b in builds.items()}, pipeline_files


def _on_host(target: Target, deps: dict[str, Deployment]) -> bool:
    """Whether the transformer's activations live in the host's memory (the memory guard's concern)."""
    if target == TORCH_TARGET:
        from common.torch_runtime import TorchRuntime

        return TorchRuntime.from_parameters(deps[FLUX_TRANSFORMER].parameters).on_host
    return target == "cpu"


def _memory_facts(pipeline_assets: Path, on_host: bool) -> dict[str, str]:
    """What the memory guards (the facade's and `generate`'s own) need to know about this
    transformer (contract.cost)."""
    config = json.loads((pipeline_assets / "transformer" / "config.json").read_text())
    return {
        ATTENTION_HEADS_PARAMETER: str(config["num_attention_heads"]),
        TEXT_TOKENS_PARAMETER: str(read_max_sequence_length(pipeline_assets)),
        HOST_MEMORY_SHARE_PARAMETER: str(CPU_HOST_MEMORY_SHARE if on_host else 0),
    }


def _local_folder(checkpoint: str | Path) -> Path:
    """A local checkpoint as it is; a hub id as the snapshot of its configs and tokenizers."""
    return Path(checkpoint) if Path(str(checkpoint)).exists() else _hub_snapshot(checkpoint)


def _hub_snapshot(repo_id: str | Path) -> Path:
    """Local folder of a hub checkpoint's configs/tokenizers (needs a hub or a warm cache)."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(str(repo_id), allow_patterns=["*.json", "*.txt", "*.model", "tokenizer*/*", "scheduler/*"])
    )


@dataclass(frozen=True)
class FluxBuild:
    """Everything a publish writes for the FLUX components, and what `generate` pins."""

    checkpoint: str | Path
    provenance: dict[str, Any]
    """The whole pipeline's inputs: checkpoint, LoRA, scale, trigger word, opset, precision."""
    trigger_word: str
    lora_targets: frozenset[str]
    """The modules the LoRA adapts (`transformer`, `text_encoder`)."""
    deployments: dict[str, Deployment]
    parts: ComponentParts
    report: dict[str, Any]
    pipeline_files: dict[str, Path] = field(default_factory=dict)
    """Files every `generate` / `generate_stream` version of this build ships beside its assets
    (gpu-torch: contract.specs.FUSED_LORA_FILE, the transformer LoRA its calls name)."""


def build_flux(
    target: Target,
    checkpoint: str | Path | None = None,
    lora: str | Path | None = None,
    lora_scale: float | None = None,
    trigger_word: str | None = None,
    settings: FluxSettings | None = None,
    export_settings: ExportSettings | None = None,
    progress: Callable[[str, object], None] | None = None,
    torch_settings: TorchTargetSettings | None = None,
) -> FluxBuild:
    """Export (or reuse) every FLUX component for `target`. Unset sources come from `settings`
    (the local random-weight build by default); the trigger word from the LoRA's manifest.
    `torch_settings`: gpu-torch only (None: FLUXSERVE_TORCH_ from the environment)."""
    from export.flux.lora import lora_targets, read_lora_manifest

    s = settings or FluxSettings()
    checkpoint = checkpoint if checkpoint is not None else default_checkpoint(s)
    lora = lora if lora is not None else default_lora(s)
    scale = s.lora_scale if lora_scale is None else lora_scale
    if trigger_word is None:
        trigger_word = str(read_lora_manifest(lora).get("trigger_word") or s.trigger_word) if lora else s.trigger_word
    provenance = {
        "checkpoint": str(checkpoint),
        "checkpoint_files": source_fingerprint(checkpoint),
        "lora": str(lora) if lora else None,
        "lora_files": source_fingerprint(lora) if lora else None,
        "lora_scale": scale,
        "trigger_word": trigger_word,
        "onnx_opset": s.onnx_opset,
        # The GPU target builds TensorRT engines from the fp32 graph: the choice is CPU-only.
        TRANSFORMER_PRECISION: s.transformer_precision if target == "cpu" else "fp32",
    }
    if (branch := adapter_branch(s, target, provenance["checkpoint_files"])) is not None:
        provenance[ADAPTER_BRANCH] = branch
    targets = lora_targets(lora, s.lora_weight_name) if lora else frozenset()
    pipeline_files: dict[str, Path] = {}
    if target == TORCH_TARGET:
        deps, parts, report, pipeline_files = _torch_parts(
            checkpoint, lora, scale, targets, provenance, s, export_settings, torch_settings, progress
        )
    else:
        deps, parts, report = _onnx_parts(checkpoint, lora, scale, targets, provenance, s, export_settings, progress)
    return FluxBuild(checkpoint, provenance, trigger_word, targets, deps, parts, report, pipeline_files)


@contextmanager
def staged_pipeline(checkpoint: str | Path, settings: FluxSettings) -> Iterator[Path]:
    """The denoising loop's assets (configs, tokenizers, scheduler) of `checkpoint`, copied into a
    temporary folder under the export root; the folder is removed on exit."""
    settings.export_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.export_root) as tmp:
        yield copy_loop_assets(_local_folder(checkpoint), Path(tmp) / "pipeline")


def generate_version_files(
    assets: Path, components: Mapping[str, int], extra: Mapping[str, Path] | None = None
) -> dict[str, Path]:
    """The files of a `generate` (or `generate_stream`) version: the loop's assets from
    `staged_pipeline`, `components.json`, the component versions its calls pin, and `extra`
    (FluxBuild.pipeline_files)."""
    pins = assets.parent / "components.json"
    pins.write_text(json.dumps(dict(components), indent=2))
    return {"pipeline": assets, "components.json": pins, **(extra or {})}


def generate_deployment(build: FluxBuild, name: str, assets: Path, target: Target) -> Deployment:
    """`generate`'s (or its streaming twin's) deployment with this build's trigger words and the
    memory facts of its transformer."""
    dep = build.deployments[name]
    on_host = _on_host(target, build.deployments)
    parameters = {**dep.parameters, TRIGGER_PARAMETER: build.trigger_word, **_memory_facts(assets, on_host)}
    return replace(dep, parameters=parameters)
