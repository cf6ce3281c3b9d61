"""The practical limit on this machine: ONNX Runtime in-process, no server, at its best batch size.

Same ONNX file and tokenizer as the served `classifier_onnx`, the same chat messages, the same
padding rule (to the longest text of the batch). Tokenization is inside the timed loop because
the served path tokenizes too; so the figure is "texts classified per second by the bare model
code", which no server can beat on the same cores.

Two layouts of the same cores, and the limit is the better one: one session whose operators use
2 intra-op threads, and 2 sessions of 1 thread each, driven by 2 Python threads (ONNX Runtime and
the Rust tokenizer release the GIL). On 2 cores the second was measured ~1.5x the first at 8
texts per batch: a small batch's operators are too short to split across threads without the
threads waiting on each other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from client.contract import CLASSIFY_LIMITS
from common.chat_text import normalized, recorded_normalizer
from common.ort_session import make_session

log = logging.getLogger(__name__)

LAYOUTS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1))
"""(sessions, intra-op threads each) measured for the limit."""


def _feeds(tokenizer: object, texts: list[str], normalize: Callable[[str], str] | None) -> dict[str, np.ndarray]:
    enc = tokenizer(
        normalized(texts, normalize),
        padding="longest",
        truncation=True,
        max_length=CLASSIFY_LIMITS.max_tokens,
        return_tensors="np",
    )  # type: ignore[operator]
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def _measure(
    sessions: list,
    tokenizer: object,
    normalize: Callable[[str], str] | None,
    pool: list[str],
    bs: int,
    duration_s: float,
    min_batches: int,
    max_batches: int,
) -> dict[str, object]:
    """Every session runs batches of `bs` in its own thread for `duration_s` (after a warm-up batch)."""
    outputs = [o.name for o in sessions[0].get_outputs()]
    latencies: list[list[float]] = [[] for _ in sessions]
    clock = {"started": 0.0, "deadline": 0.0}

    def start_clock() -> None:
        # A barrier action runs before any waiter is released: the clock starts before the first
        # timed batch even when the main thread is the last to get the GIL back.
        clock["started"] = time.perf_counter()
        clock["deadline"] = clock["started"] + duration_s

    start = threading.Barrier(len(sessions) + 1, action=start_clock)

    def loop(i: int) -> None:
        offset = i * 997  # sessions read different texts, as concurrent requests would
        session, lat = sessions[i], latencies[i]

        def batch() -> list[str]:
            nonlocal offset
            chunk = [pool[(offset + j) % len(pool)] for j in range(bs)]
            offset += bs
            return chunk

        session.run(outputs, _feeds(tokenizer, batch(), normalize))  # warm-up: first run at a new shape allocates
        start.wait()
        while len(lat) < max_batches and (len(lat) < min_batches or time.perf_counter() < clock["deadline"]):
            t0 = time.perf_counter()
            session.run(outputs, _feeds(tokenizer, batch(), normalize))
            lat.append(time.perf_counter() - t0)

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(len(sessions))]
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
) -> dict[str, object]:
    """Texts/s at each (layout, batch size); the limit is the best of them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # The served path spells emoji out before tokenizing when the model was trained so: timed here too.
    labels = Path(tokenizer_dir) / "labels.json"
    normalize = recorded_normalizer(labels) if labels.exists() else None
    pool = list(texts)
    rows = []
    for n_sessions, threads in layouts:
        sessions = [make_session(onnx_path, threads, spinning=True) for _ in range(n_sessions)]
        for bs in batch_sizes:
            row = {
                "sessions": n_sessions,
                "threads": threads,
                **_measure(sessions, tokenizer, normalize, pool, bs, duration_s, min_batches, max_batches),
            }
            log.info(
                "ORT in-process %dx%d threads, batch %d: %.1f texts/s", n_sessions, threads, bs, row["texts_per_s"]
            )
            rows.append(row)
    best = max(rows, key=lambda r: r["texts_per_s"])
    return {
        "onnx": str(onnx_path),
        "sweep": rows,
        "best_sessions": best["sessions"],
        "best_threads": best["threads"],
        "best_batch_size": best["batch_size"],
        "best_texts_per_s": best["texts_per_s"],
    }
