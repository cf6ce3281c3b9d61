"""`fluxserve-train`: offline training commands (the API runs the same code as jobs)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from common.paths import BUILD_DIR
from export.triton_config import TORCH_TARGET
from publish.repository import SOURCE_REPOSITORY
from training.classifier import ClassifierTrainSettings, is_up_to_date, train_classifier


def defaults(repo: Path, target: str | None = None) -> int:
    """What `make models` runs: train the classifier when its data or settings changed, then export
    it and the default FLUX (both idempotent: unchanged models keep their version). `target`
    gpu-torch: the FLUX components in PyTorch (FLUXSERVE_TORCH_), the classifier as on cpu; None:
    the target the repository was published for (cpu for a new one), so a later `make up` on a
    gpu-torch repository keeps it."""
    from publish.cli import export_classifier, export_flux

    settings = ClassifierTrainSettings()
    if not is_up_to_date(settings):
        train_classifier(settings)
    export_classifier(settings.output_dir, repo, target, force=False)
    export_flux(repo, target, force=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluxserve-train")
    sub = parser.add_subparsers(dest="cmd", required=True)
    cls = sub.add_parser("classifier", help="fine-tune the image-request classifier")
    cls.add_argument("--base-model", help="all-minilm-l6-v2 (offline default), facebook/bart-large-mnli, or a path")
    cls.add_argument("--output-dir", type=Path)
    cls.add_argument("--epochs", type=int)
    cls.add_argument(
        "--if-stale", action="store_true", help="skip when the output was trained on the current data and settings"
    )
    sw = sub.add_parser("seeds", help="train recipe variants under several seeds (each its own split); tabulate")
    sw.add_argument(
        "--vary",
        default="text_normalization=none,emoji-as-words",
        help="SETTING=V1,V2,... (a FLUXSERVE_CLASSIFIER_ setting, lower case); the rest from the environment",
    )
    sw.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    sw.add_argument("--out", type=Path, default=BUILD_DIR / "classifier-seeds")
    dflt = sub.add_parser("defaults", help="train the classifier if needed, then export everything `make up` serves")
    dflt.add_argument("--repo", type=Path, default=SOURCE_REPOSITORY, help="Triton model repository")
    dflt.add_argument(
        "--target",
        choices=("cpu", "gpu", TORCH_TARGET),
        help=f"cpu, gpu (TensorRT) or {TORCH_TARGET} (PyTorch on CUDA; device and dtype: FLUXSERVE_TORCH_*); "
        "default: the target the repository's generate was published for (cpu for a new one)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("onnx_ir", "onnxscript"):  # a line per rewritten node during every ONNX export
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if args.cmd == "defaults":
        return defaults(args.repo, args.target)
    if args.cmd == "seeds":
        from training.seed_sweep import sweep

        setting, _, values = args.vary.partition("=")
        if not values:
            parser.error("--vary takes SETTING=V1,V2,...")
        rows = sweep(ClassifierTrainSettings(), setting.strip(), values.split(","), args.seeds, args.out)
        sys.stdout.write((args.out / "summary.md").read_text())
        return 0 if rows else 1
    if args.cmd == "classifier":
        overrides = {
            k: v
            for k, v in {"base_model": args.base_model, "output_dir": args.output_dir, "epochs": args.epochs}.items()
            if v is not None
        }
        settings = ClassifierTrainSettings(**overrides)
        if args.if_stale and is_up_to_date(settings):
            logging.getLogger(__name__).info("classifier already trained at %s", settings.output_dir)
            return 0
        metrics = train_classifier(settings)
        json.dump({k: metrics[k] for k in ("sizes", "validation", "test", "threshold")}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
