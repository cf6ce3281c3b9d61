"""The fine-tuned classifier into the model repository and a running Triton: `classifier_onnx`
and `classify` (built by export.classifier), versioned, loaded, rolled back on failure."""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager
from pathlib import Path

from export.classifier import build_classifier, recorded_test_accuracy
from export.triton_config import Target
from publish.hot_swap import publish_and_load
from publish.model_control import ready_versions
from publish.repository import MANIFEST, Published, publish, versions

log = logging.getLogger(__name__)


def publish_classifier(
    model_dir: Path, repo: Path, target: Target = "cpu", work_dir: Path | None = None, force: bool = False
) -> dict[str, Published | float]:
    """Export (when the model changed) and write both Triton models; returns versions and error."""
    build = build_classifier(model_dir, target, work_dir, force)
    out: dict[str, Published | float] = {
        name: publish(repo, m.deployment, target, m.files, m.provenance, force=force, report=m.report)
        for name, m in build.models.items()
    }
    out["parity_max_abs_logit_error"] = build.parity_max_abs_logit_error
    out["precision"] = build.precision  # type: ignore[assignment]
    return out


def publish_and_swap_classifier(
    model_dir: Path,
    repo: Path,
    triton_http_url: str,
    work_dir: Path | None = None,
    keep_versions: int = 2,
    target: Target = "cpu",
    force: bool = False,
    lock: AbstractContextManager[object] | None = None,
    lock_timeout_s: float = 3600.0,
) -> dict[str, Published | float]:
    """Publish a fine-tuned classifier and load it into a running Triton; on failure the new
    versions are removed and the previous classifier keeps serving (publish.hot_swap.SwapError)."""
    return publish_and_load(
        repo,
        triton_http_url,
        ["classifier_onnx", "classify"],
        lambda: publish_classifier(model_dir, repo, target=target, work_dir=work_dir, force=force),
        keep_versions=keep_versions,
        lock=lock,
        lock_timeout_s=lock_timeout_s,
    )


def serving_classifier_accuracy(repo: Path, triton_http_url: str | None = None) -> float | None:
    """Test-split accuracy of the `classify` version Triton serves (the newest READY one; the
    newest on disk when Triton cannot say), from its manifest or, for versions published before
    manifests carried it, from the metrics beside the model it was exported from. None: unknown."""
    version: str | None = None
    if triton_http_url:
        try:
            ready = ready_versions(triton_http_url, "classify")
            version = ready[-1] if ready else None
        except Exception as e:  # noqa: BLE001 - Triton down is "ask the disk", not a failure
            log.warning("could not ask Triton which classifier serves: %s", e)
    if version is None:
        on_disk = versions(repo, "classify")
        version = str(on_disk[-1]) if on_disk else None
    if version is None:
        return None
    try:
        manifest = json.loads((repo / "classify" / version / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    recorded = manifest.get("report", {}).get("test_accuracy")
    if recorded is not None:
        return float(recorded)
    source = manifest.get("provenance", {}).get("classifier")
    return recorded_test_accuracy(Path(source)) if source else None
