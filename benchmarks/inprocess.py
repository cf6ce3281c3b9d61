"""The practical limit on this machine: the served encoder code in-process, no server, at its best
batch size.

Same ONNX file, the same tokenization code as the served `classify` (the Rust tokenizer driven
directly, the recorded text normalization) and the same runner with the deployment's knobs (rows
regrouped by real length, serving/onnx_runner.py), on the same chat messages. Tokenization is inside
the timed loop because the served path tokenizes too; so the figure is "texts classified per second
by the model code the server runs", which no server can beat on the same cores. (Until this round
it used the Hugging Face tokenizer wrapper and one padded call per batch, and the served path had
become cheaper per text than that "limit": docs/decisions/honest-inprocess-limit.md.)

Two layouts of the same cores, and the limit is the better one: one session whose operators use
2 intra-op threads, and 2 sessions of 1 thread each, driven by 2 Python threads (ONNX Runtime and
the Rust tokenizer release the GIL). On 2 cores the second wins at chat-sized batches: a small
batch's operators are too short to split across threads without the threads waiting on each other
(docs/decisions/classify-layout-and-fusion.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contract.specs import CLASSIFIER_ONNX
from export.deployments import classifier_deployments
from serving.classify_encoder import InlineEncoder
from serving.classify_pipeline import ClassifyPipeline
from serving.onnx_runner import runner_from_parameters

log = logging.getLogger(__name__)

LAYOUTS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1))
"""(sessions, intra-op threads each) measured for the limit."""


def _measure(
    runners: list[InlineEncoder],
    pipeline: ClassifyPipeline,
    pool: list[str],
    bs: int,
    duration_s: float,
    min_batches: int,
    max_batches: int,
) -> dict[str, object]:
    """Every runner runs batches of `bs` in its own thread for `duration_s` (after a warm-up batch)."""
    latencies: list[list[float]] = [[] for _ in runners]
    clock = {"started": 0.0, "deadline": 0.0}

    def start_clock() -> None:
        # A barrier action runs before any waiter is released: the clock starts before the first
        # timed batch even when the main thread is the last to get the GIL back.
        clock["started"] = time.perf_counter()
        clock["deadline"] = clock["started"] + duration_s

    start = threading.Barrier(len(runners) + 1, action=start_clock)

    def loop(i: int) -> None:
        offset = i * 997  # sessions read different texts, as concurrent requests would
        runner, lat = runners[i], latencies[i]

        def batch() -> list[str]:
            nonlocal offset
            chunk = [pool[(offset + j) % len(pool)] for j in range(bs)]
            offset += bs
            return chunk

        runner.logits(pipeline.tokenize(batch()))  # warm-up: first run at a new shape allocates
        start.wait()
        while len(lat) < max_batches and (len(lat) < min_batches or time.perf_counter() < clock["deadline"]):
            t0 = time.perf_counter()
            runner.logits(pipeline.tokenize(batch()))
            lat.append(time.perf_counter() - t0)

    rescued_before = sum(r.rescued_rows for r in runners)
    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(len(runners))]
    for w in workers:
        w.start()
    start.wait()
    for w in workers:
        w.join()
    wall = time.perf_counter() - clock["started"]
    n_batches = sum(len(lat) for lat in latencies)
    return {
        "batch_size": bs,
        "batches": n_batches,
        "texts_per_s": round(n_batches * bs / wall, 2),
        "batch_p50_ms": round(float(np.percentile([x for lat in latencies for x in lat], 50)) * 1000, 3),
        # warm-up batches included: one per runner
        "rescued_share": round(
            (sum(r.rescued_rows for r in runners) - rescued_before) / ((n_batches + len(runners)) * bs), 4
        ),
    }


def ort_sweep(
    onnx_path: Path,
    tokenizer_dir: Path,
    texts: Sequence[str],
    batch_sizes: Sequence[int] = (1, 4, 8, 16, 32, 64),
    layouts: Sequence[tuple[int, int]] = LAYOUTS,
    duration_s: float = 3.0,
    min_batches: int = 3,
    max_batches: int = 100_000,
    rescue: tuple[Path, float] | None = None,
) -> dict[str, object]:
    """Texts/s at each (layout, batch size); the limit is the best of them. `rescue`: the fp32
    graph and margin `classify` re-encodes int8's near-boundary rows with, when it serves one."""
    # The trained model's folder holds its tokenizer and labels.json (the recorded text normalization).
    pipeline = ClassifyPipeline(Path(tokenizer_dir), tokenizer_dir=Path(tokenizer_dir))
    knobs = classifier_deployments()[CLASSIFIER_ONNX.name].parameters
    pool = list(texts)
    rows = []
    for n_sessions, threads in layouts:
        layout = {**knobs, "intra_op_threads": str(threads)}
        runners = [
            InlineEncoder(
                runner_from_parameters(onnx_path, layout, spinning=True),
                runner_from_parameters(rescue[0], layout, spinning=True) if rescue else None,
                rescue[1] if rescue else 0.0,
            )
            for _ in range(n_sessions)
        ]
        for bs in batch_sizes:
            row = {
                "sessions": n_sessions,
                "threads": threads,
                **_measure(runners, pipeline, pool, bs, duration_s, min_batches, max_batches),
            }
            log.info(
                "ORT in-process %dx%d threads, batch %d: %.1f texts/s", n_sessions, threads, bs, row["texts_per_s"]
            )
            rows.append(row)
    best = max(rows, key=lambda r: r["texts_per_s"])
    return {
        "onnx": str(onnx_path),
        "rescue": {"graph": str(rescue[0]), "margin": rescue[1]} if rescue else None,
        "sweep": rows,
        "best_sessions": best["sessions"],
        "best_threads": best["threads"],
        "best_batch_size": best["batch_size"],
        "best_texts_per_s": best["texts_per_s"],
    }
