"""`fluxserve-train`: offline training commands (the API runs the same code as jobs)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from training.classifier import ClassifierTrainSettings, is_up_to_date, train_classifier


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluxserve-train")
    sub = parser.add_subparsers(dest="cmd", required=True)
    cls = sub.add_parser("classifier", help="fine-tune the image-request classifier")
    cls.add_argument("--base-model", help="all-minilm-l6-v2 (offline default), facebook/bart-large-mnli, or a path")
    cls.add_argument("--output-dir", type=Path)
    cls.add_argument("--epochs", type=int)
    cls.add_argument("--if-stale", action="store_true", help="skip when the output was trained on the current data and settings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "classifier":
        overrides = {k: v for k, v in {"base_model": args.base_model, "output_dir": args.output_dir, "epochs": args.epochs}.items() if v is not None}
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
