"""What a caller sees of a job record: paths relative to the job's folder, no other host paths.

The worker records paths relative to the job already (training.tasks); this view also cleans what
it cannot control (a manifest naming the base checkpoint, an exception text quoting a file), so no
absolute path of the serving host reaches a caller.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from training.jobs import Job

# An absolute POSIX path not inside a URL or a relative path ("http://h/x", "a/b" stay as they are).
_ABS_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\",;()\[\]{}<>]+/)*[^\s/'\",;()\[\]{}<>]*")


def _scrub(value: Any, folder: str) -> Any:
    if isinstance(value, str):
        value = value.replace(folder + "/", "").replace(folder, ".")
        return _ABS_PATH.sub(lambda m: "…/" + (m.group(0).rstrip("/").rsplit("/", 1)[-1] or ""), value)
    if isinstance(value, dict):
        return {k: _scrub(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, folder) for v in value]
    return value


def public_job(job: Job, folder: Path) -> dict[str, Any]:
    """`job.public()` with result, progress and error cleaned of host paths (params are the
    caller's own input and are shown as given)."""
    data = job.public()
    for key in ("result", "progress", "error"):
        data[key] = _scrub(data[key], str(folder))
    return data
