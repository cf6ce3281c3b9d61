"""`fluxserve-export`: (re-)export models into the Triton model repository.

Idempotent: a model whose inputs and settings did not change keeps its current version.

    fluxserve-export classifier                 # fine-tuned classifier -> classify + classifier_onnx
    fluxserve-export flux --size small          # local FLUX + LoRA -> generate + flux_* models
    fluxserve-export defaults                   # what `make up` serves
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from export.repository import SOURCE_REPOSITORY

log = logging.getLogger("fluxserve.export")


def export_classifier(model_dir: Path, repo: Path, target: str, force: bool) -> None:
    from export.classifier import publish_classifier

    result = publish_classifier(model_dir, repo, target=target, force=force)  # type: ignore[arg-type]
    for name in ("classifier_onnx", "classify"):
        pub = result[name]
        log.info("%s: version %d %s", name, pub.version, "written" if pub.created else "unchanged")


def main(argv: Sequence[str] | None = None) -> int:
    from training.classifier import ClassifierTrainSettings

    parser = argparse.ArgumentParser(prog="fluxserve-export", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=SOURCE_REPOSITORY, help="Triton model repository")
    parser.add_argument("--target", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--force", action="store_true", help="write a new version even if nothing changed")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("classifier")
    c.add_argument("--model-dir", type=Path, default=ClassifierTrainSettings().output_dir)
    sub.add_parser("defaults", help="train (if needed) and export everything `make up` serves")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "classifier":
        export_classifier(args.model_dir, args.repo, args.target, args.force)
    elif args.cmd == "defaults":
        from training.classifier import is_up_to_date, train_classifier

        settings = ClassifierTrainSettings()
        if not is_up_to_date(settings):
            train_classifier(settings)
        export_classifier(settings.output_dir, args.repo, args.target, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
