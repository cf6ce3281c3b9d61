"""The in-process limit for /generate: the served artifacts run by FluxLoop on ONNX Runtime
sessions in this process, no server, no BLS, no HTTP.

Same ONNX files (the versions the newest `generate` pins), the same pipeline assets, prompts and
image size as the served targets, and the same prompt cache (FluxLoop's default preparation).
`concurrency` threads share one session per component; the best of the thread counts tried
is the limit a served figure is compared with.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.workload import GENERATE_PROMPTS, GenerateWorkload
from common.adapter_bank import zero_branch_feeds
from common.ort_session import make_session
from contract.specs import (
    FLUX_COMPONENTS,
    FLUX_IO_NAMES,
    FLUX_TEXT_ENCODER,
    FLUX_TEXT_ENCODER_2,
    FLUX_TRANSFORMER,
    FLUX_VAE_DECODER,
    GENERATE,
    GenerateParams,
)
from publish.repository import versions

log = logging.getLogger(__name__)


def _served_loop(repo: Path, threads: int):
    from serving.flux_loop import FluxLoop

    gen_dir = repo / GENERATE.name / str(versions(repo, GENERATE.name)[-1])
    pins = json.loads((gen_dir / "components.json").read_text())

    def component(name: str):
        session = make_session(repo / name / str(pins[name]) / "model.onnx", threads)
        inputs, (output,) = FLUX_IO_NAMES[name]
        present = {i.name for i in session.get_inputs()}
        ranks = {i.name: len(i.shape) for i in session.get_inputs()}

        def run(*args: np.ndarray) -> np.ndarray:
            feeds = {n: a for n, a in zip(inputs, args) if n in present}
            # Per-item scalars are [B] in the graph (Triton reshapes them the same way).
            feeds = {n: a.reshape(a.shape[0]) if ranks[n] == 1 else a for n, a in feeds.items()}
            # The transformer with the adapter branch runs as a request without an adapter: slot 0.
            feeds |= zero_branch_feeds(session.get_inputs(), args[0].shape[0])
            return session.run([output], feeds)[0]

        return run

    assert set(FLUX_COMPONENTS) <= set(pins), f"generate pins {sorted(pins)}"
    return FluxLoop(
        gen_dir / "pipeline",
        *(component(n) for n in (FLUX_TEXT_ENCODER, FLUX_TEXT_ENCODER_2, FLUX_TRANSFORMER, FLUX_VAE_DECODER)),
    )


def flux_inprocess(
    repo: Path, params: GenerateWorkload, concurrency: Sequence[int] = (1, 4), requests: int = 16, threads: int = 2
) -> dict[str, object]:
    """Images per second of FluxLoop on the served ONNX files, per number of calling threads."""

    loop = _served_loop(repo, threads)
    runs = []
    for conc in concurrency:
        counter = iter(range(requests))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                prompt = GENERATE_PROMPTS[i % len(GENERATE_PROMPTS)]
                loop(
                    GenerateParams(
                        prompt=prompt,
                        width=params.width,
                        height=params.height,
                        steps=params.steps,
                        guidance=params.guidance,
                        seed=i,
                    )
                )

        loop(
            GenerateParams(
                prompt=GENERATE_PROMPTS[0],
                width=params.width,
                height=params.height,
                steps=params.steps,
                guidance=params.guidance,
                seed=0,
            )
        )
        started = time.perf_counter()
        pool = [threading.Thread(target=worker) for _ in range(conc)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        seconds = time.perf_counter() - started
        runs.append({"concurrency": conc, "requests": requests, "images_per_s": round(requests / seconds, 3)})
        log.info("in-process FLUX, %d threads: %.2f images/s", conc, requests / seconds)
    best = max(runs, key=lambda r: r["images_per_s"])
    return {
        "runs": runs,
        "best_images_per_s": best["images_per_s"],
        "intra_op_threads": threads,
        "transformer_precision": served_transformer_precision(repo),
    }


def served_transformer_precision(repo: Path) -> str:
    """fp32 or int8: what the newest generate's transformer serves (export.flux.transformer_precision)."""
    from export.flux.transformer_precision import PRECISION_FILE

    gen_dir = repo / GENERATE.name / str(versions(repo, GENERATE.name)[-1])
    pin = json.loads((gen_dir / "components.json").read_text())[FLUX_TRANSFORMER]
    choice = repo / FLUX_TRANSFORMER / str(pin) / PRECISION_FILE
    return json.loads(choice.read_text())["served"] if choice.exists() else "fp32"
