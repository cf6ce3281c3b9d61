"""The practical limit on this machine: ONNX Runtime in-process, no server, at its best batch size.

Same ONNX file and tokenizer as the served `classifier_onnx`, the same chat messages, the same
padding rule (to the longest text of the batch), 2 intra-op threads. Tokenization is inside the
timed loop because the served path tokenizes too; so the figure is "texts classified per second
by the bare model code", which no server can beat on the same cores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from client.contract import CLASSIFY_LIMITS
from common.ort_session import make_session

log = logging.getLogger(__name__)


def _feeds(tokenizer: object, texts: list[str]) -> dict[str, np.ndarray]:
    enc = tokenizer(
        texts, padding="longest", truncation=True, max_length=CLASSIFY_LIMITS.max_tokens, return_tensors="np"
    )  # type: ignore[operator]
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def ort_sweep(
    onnx_path: Path,
    tokenizer_dir: Path,
    texts: Sequence[str],
    batch_sizes: Sequence[int] = (1, 4, 8, 16, 32, 64),
    threads: int = 2,
    duration_s: float = 3.0,
    min_batches: int = 3,
    max_batches: int = 100_000,
) -> dict[str, object]:
    """Texts/s at each batch size (each measured for `duration_s`, after one warm-up batch)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    session = make_session(onnx_path, threads, spinning=True)
    outputs = [o.name for o in session.get_outputs()]
    pool = list(texts)
    rows = []
    offset = 0
    for bs in batch_sizes:

        def batch() -> list[str]:
            nonlocal offset
            chunk = [pool[(offset + j) % len(pool)] for j in range(bs)]
            offset += bs
            return chunk

        session.run(outputs, _feeds(tokenizer, batch()))  # warm-up: first run at a new shape allocates
        n_batches, latencies = 0, []
        started = time.perf_counter()
        while n_batches < max_batches and (n_batches < min_batches or time.perf_counter() - started < duration_s):
            t0 = time.perf_counter()
            session.run(outputs, _feeds(tokenizer, batch()))
            latencies.append(time.perf_counter() - t0)
            n_batches += 1
        wall = time.perf_counter() - started
        row = {
            "batch_size": bs,
            "batches": n_batches,
            "texts_per_s": round(n_batches * bs / wall, 2),
            "batch_p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 3),
        }
        log.info("ORT in-process batch %d: %.1f texts/s", bs, row["texts_per_s"])
        rows.append(row)
    best = max(rows, key=lambda r: r["texts_per_s"])
    return {
        "threads": threads,
        "onnx": str(onnx_path),
        "sweep": rows,
        "best_batch_size": best["batch_size"],
        "best_texts_per_s": best["texts_per_s"],
    }
