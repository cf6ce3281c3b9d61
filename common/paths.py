"""Where the project's folders are. Settings classes take their defaults from here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
"""The Triton repository: committed model.py sources, generated configs and versions."""
BUILD_DIR = PROJECT_ROOT / "build"
"""Generated artifacts (checkpoints, ONNX exports, jobs, logs); never committed."""
CLASSIFIER_MODEL_DIR = BUILD_DIR / "classifier" / "model"
"""Where `fluxserve-train classifier` writes the fine-tuned classifier and export reads it."""
RECOMMENDED_BATCHING_FILE = PROJECT_ROOT / "data" / "recommended_batching.json"
"""The classifier deployment `fluxserve-bench sweep` measured best (committed); export reads its defaults here."""


@contextlib.contextmanager
def written_as_new_file(dst: Path) -> Iterator[Path]:
    """A sibling temporary path to write `dst`'s new content to; on success it replaces `dst`.

    Published model versions hard-link build outputs (publish/repository.py), so a writer that
    reopened `dst` in place would change every published version sharing its inode, rollbacks
    included. The rename gives `dst` a new inode and leaves those links as they were; a failed
    write leaves `dst` untouched.
    """
    tmp = dst.with_name(f"{dst.stem}.partial{dst.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
