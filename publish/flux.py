"""FLUX into the model repository and a running Triton.

`publish_flux` writes one new version of each component (`flux_text_encoder`,
`flux_text_encoder_2`, `flux_transformer`, `flux_vae_decoder`), of `flux_prepare`, and of
`generate` and `generate_stream`, whose `components.json` pins the component versions they were
built with (the artifacts come from export.flux_build). `publish_and_swap` then asks a running
Triton to load them (components first, `generate` last), and rolls back on failure so the
previous version keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.specs import FLUX_COMPONENTS, FLUX_PREPARE, GENERATE, GENERATE_STREAM
from export.deployments import ExportSettings
from export.flux.settings import FluxSettings
from export.flux_build import FluxBuild, build_flux, generate_deployment, generate_version_files, staged_pipeline
from export.triton_config import Deployment, Target
from publish.hot_swap import publish_and_load
from publish.repository import MANIFEST, latest_manifest, publish

if TYPE_CHECKING:
    from export.torch_target import TorchTargetSettings


def publish_flux(
    repo: Path,
    checkpoint: str | Path | None = None,
    lora: str | Path | None = None,
    lora_scale: float | None = None,
    trigger_word: str | None = None,
    target: Target | None = None,
    settings: FluxSettings | None = None,
    export_settings: ExportSettings | None = None,
    force: bool = False,
    progress: Callable[[str, object], None] | None = None,
    torch_settings: TorchTargetSettings | None = None,
) -> dict[str, Any]:
    """Export and write new versions (idempotent per component). Returns {model: version, ...,
    "created": [models with a new version], "report": export report}. `target` None: the one
    the repository's `generate` was published for (a training job's LoRA keeps the deployment's
    target), else cpu. `torch_settings`: gpu-torch only (None: FLUXSERVE_TORCH_ from the environment)."""
    target = target or deployed_target(repo)
    s = settings or FluxSettings()
    build = build_flux(target, checkpoint, lora, lora_scale, trigger_word, s, export_settings, progress, torch_settings)
    out: dict[str, Any] = {"report": build.report, "created": []}
    components: dict[str, int] = {}
    for name in FLUX_COMPONENTS:
        files, component_prov, component_report = build.parts[name]
        dep = build.deployments[name]
        components[name] = _write(out, repo, dep, target, files, component_prov, force=force, report=component_report)
    with staged_pipeline(build.checkpoint, s) as assets:
        # flux_prepare depends on the checkpoint only: a LoRA swap keeps its version (and Triton
        # keeps it loaded), while generate, numpy-only, is what gets reloaded.
        checkpoint_only = {k: build.provenance[k] for k in ("checkpoint", "checkpoint_files")}
        prepare = build.deployments[FLUX_PREPARE.name]
        components[FLUX_PREPARE.name] = _write(
            out, repo, prepare, target, {"pipeline": assets}, checkpoint_only, force=force
        )
        pipelines = _write_pipelines(out, repo, build, target, assets, components, force)
    out.update(pipelines)
    out.update(components)
    return out


def _write(
    out: dict[str, Any],
    repo: Path,
    dep: Deployment,
    target: Target,
    files: Mapping[str, Path],
    provenance: Mapping[str, Any],
    **kwargs: Any,
) -> int:
    """publish() one model; a new version is listed in out["created"]. Returns its version."""
    pub = publish(repo, dep, target, files, provenance, **kwargs)
    if pub.created:
        out["created"].append(pub.name)
    return pub.version


def _write_pipelines(
    out: dict[str, Any],
    repo: Path,
    build: FluxBuild,
    target: Target,
    assets: Path,
    components: Mapping[str, int],
    force: bool,
) -> dict[str, int]:
    """`generate` and `generate_stream`, pinned to `components`; returns their versions."""
    files = generate_version_files(assets, components, build.pipeline_files)
    provenance = {**build.provenance, "lora_targets": sorted(build.lora_targets), "components": dict(components)}
    written: dict[str, int] = {}
    # The streaming twin runs the same pipeline on the same pinned components; its version
    # number follows generate's, so both doors report the same model_version.
    for spec in (GENERATE, GENERATE_STREAM):
        dep = generate_deployment(build, spec.name, assets, target)
        min_version = written.get(GENERATE.name, 1)
        written[spec.name] = _write(out, repo, dep, target, files, provenance, force=force, min_version=min_version)
    return written


def deployed_target(repo: Path) -> Target:
    """The target the repository's newest `generate` was published for; cpu when there is none."""
    manifest = latest_manifest(repo, GENERATE.name) or {}
    return manifest.get("target") or "cpu"


def publish_and_swap(
    repo: Path,
    triton_http_url: str,
    keep_versions: int = 2,
    lock: AbstractContextManager[object] | None = None,
    lock_timeout_s: float = 3600.0,
    **publish_kwargs: Any,
) -> dict[str, Any]:
    """Publish a new FLUX export (`publish_flux(repo, **publish_kwargs)`) and load it into a
    running Triton without downtime.

    Components load first and `generate` last: its new version pins the new components, so a
    request runs entirely on the old set or entirely on the new one. On failure the new version
    folders are removed and the old set keeps serving (publish.hot_swap.SwapError is raised).
    """
    started = time.monotonic()
    result = publish_and_load(
        repo,
        triton_http_url,
        [*FLUX_COMPONENTS, FLUX_PREPARE.name, GENERATE.name, GENERATE_STREAM.name],
        lambda: publish_flux(repo, **publish_kwargs),
        keep_versions=keep_versions,
        lock=lock,
        lock_timeout_s=lock_timeout_s,
        # Both run the same loop on the same pinned components and call nothing of each other.
        together=frozenset({GENERATE.name, GENERATE_STREAM.name}),
    )
    return {
        "model_version": str(result[GENERATE.name]),
        "components": {n: result[n] for n in (*FLUX_COMPONENTS, FLUX_PREPARE.name)},
        "created": result["created"],
        "report": result["report"],
        "publish_seconds": round(time.monotonic() - started, 1),
        "manifest": str(repo / GENERATE.name / str(result[GENERATE.name]) / MANIFEST),
    }
