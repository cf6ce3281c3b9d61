"""`fluxserve-export`: (re-)export models into the Triton model repository.

Idempotent: a model whose inputs and settings did not change keeps its current version.

    fluxserve-export classifier                 # fine-tuned classifier -> classify + classifier_onnx
    fluxserve-export flux --size small          # local FLUX + LoRA -> generate + flux_* models

`fluxserve-train defaults` trains the classifier if needed and exports everything `make up` serves.

With `--triton-url HOST:PORT` (Triton's HTTP port) the new versions are also loaded into that
running server with no downtime; if that fails they are removed and the old versions keep serving.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from common.paths import CLASSIFIER_MODEL_DIR
from contract.specs import ENDPOINTS
from export.triton_config import TORCH_TARGET
from publish.publish_lock import repository_lock
from publish.repository import SOURCE_REPOSITORY

log = logging.getLogger("fluxserve.export")


def export_classifier(
    model_dir: Path, repo: Path, target: str | None, force: bool, triton_url: str | None = None
) -> None:
    from publish.classifier import publish_and_swap_classifier, publish_classifier

    # gpu-torch serves the classifier as cpu does: its GPU machines have no onnxruntime-gpu.
    target = "cpu" if target in (None, TORCH_TARGET) else target
    if triton_url:
        result = publish_and_swap_classifier(model_dir, repo, triton_url, target=target, force=force)  # type: ignore[arg-type]
    else:
        with repository_lock(repo):  # version numbers chosen while no one else publishes
            result = publish_classifier(model_dir, repo, target=target, force=force)  # type: ignore[arg-type]
    for name in ("classifier_onnx", "classify"):
        pub = result[name]
        log.info("%s: version %d %s", name, pub.version, "written" if pub.created else "unchanged")


def export_flux(
    repo: Path,
    target: str | None,
    force: bool,
    checkpoint: str | None = None,
    lora: str | None = None,
    lora_scale: float | None = None,
    trigger_word: str | None = None,
    size: str | None = None,
    real: bool = False,
    triton_url: str | None = None,
) -> None:
    from tqdm import tqdm

    from export.flux.settings import FluxSettings
    from publish.flux import publish_and_swap, publish_flux

    settings = FluxSettings.real() if real else FluxSettings(**({"local_size": size} if size else {}))
    bar = tqdm(total=4, desc="ONNX export", unit="model", disable=None)

    def progress(name: str, result: object) -> None:
        # Called at the start (result None) and end of each component's export.
        if result is None:
            bar.set_postfix_str(name)
        else:
            bar.update(1)

    kwargs = {
        "checkpoint": checkpoint,
        "lora": lora,
        "lora_scale": lora_scale,
        "trigger_word": trigger_word,
        "target": target,
        "settings": settings,
        "force": force,
        "progress": progress,
    }
    if triton_url:
        swapped = publish_and_swap(repo, triton_url, **kwargs)
        bar.close()
        log.info(
            "generate: version %s now serving on %s (new: %s); export report: %s",
            swapped["model_version"],
            triton_url,
            swapped["created"] or "none",
            swapped["report"],
        )
        return
    with repository_lock(repo):
        result = publish_flux(repo, **kwargs)  # type: ignore[arg-type]
    bar.close()
    log.info(
        "generate: version %s (new: %s); export report: %s",
        result["generate"],
        result["created"] or "none",
        result["report"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluxserve-export", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=SOURCE_REPOSITORY, help="Triton model repository")
    parser.add_argument(
        "--target",
        choices=("cpu", "gpu", TORCH_TARGET),
        help="cpu (default for a new repository), gpu (TensorRT), gpu-torch (PyTorch on CUDA in the python "
        "backend); default: the target the repository's generate was published for",
    )
    parser.add_argument("--force", action="store_true", help="write a new version even if nothing changed")
    parser.add_argument(
        "--triton-url",
        metavar="HOST:PORT",
        help="also load the new versions into this running Triton (its HTTP port, "
        f"e.g. {ENDPOINTS.host}:{ENDPOINTS.triton_http_port})",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("classifier")
    c.add_argument("--model-dir", type=Path, default=CLASSIFIER_MODEL_DIR)
    f = sub.add_parser("flux", help="fuse a LoRA into FLUX and export generate + flux_* models")
    f.add_argument(
        "--checkpoint", help="diffusers FLUX folder or hub id (default: FLUXSERVE_FLUX_BASE_MODEL or the local build)"
    )
    f.add_argument(
        "--lora", help="LoRA folder, .safetensors or hub id (default: FLUXSERVE_FLUX_LORA or the local LoRA)"
    )
    f.add_argument("--lora-scale", type=float)
    f.add_argument("--trigger-word")
    f.add_argument(
        "--size", choices=("tiny", "small"), help="local random-weight build to use when no checkpoint is given"
    )
    f.add_argument("--real", action="store_true", help="FLUX.1-dev + Super-Realism LoRA (needs a hub and a GPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("onnx_ir", "onnxscript"):  # a line per folded initializer / rewritten node otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from publish.hot_swap import SwapError

    try:
        return _dispatch(args)
    except SwapError as e:
        log.error("not swapped in; the previous versions keep serving: %s", e)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "classifier":
        export_classifier(args.model_dir, args.repo, args.target, args.force, args.triton_url)
    elif args.cmd == "flux":
        export_flux(
            args.repo,
            args.target,
            args.force,
            args.checkpoint,
            args.lora,
            args.lora_scale,
            args.trigger_word,
            args.size,
            args.real,
            args.triton_url,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
