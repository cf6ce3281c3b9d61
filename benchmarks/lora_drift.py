"""`python -m benchmarks.lora_drift`: how far a gpu-torch transformer that switched LoRAs in place
drifts from a fresh load, in bfloat16 (serving/torch_lora.py rounds each switch once).

On the local small checkpoint and its LoRA (`make models` builds both) and a second random LoRA of
the same shape: one transformer is switched A -> B -> A ... in place, and after 1, 2, 3, 10, 11,
100 and 101 switches its weights and its output on fixed inputs are compared with a fresh bf16
load of the LoRA it holds. For scale, the same output's distance from float32 and between the two
LoRAs. Prints a markdown table (docs/benchmarks.md, "GPU path"); CPU only, about a minute.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from common.paths import BUILD_DIR
from common.torch_runtime import LoraFactors, TorchRuntime
from contract.specs import FLUX_TRANSFORMER

log = logging.getLogger(__name__)

SWITCHES = (1, 2, 3, 10, 11, 100, 101)


def factors(checkpoint: Path, lora: Path) -> LoraFactors:
    from export.flux.lora_deltas import load_lora_state
    from export.flux.torch_export import lora_factors, meta_module

    state = load_lora_state(lora, None)
    return lora_factors(*state, "transformer", 1.0, meta_module("transformer", checkpoint / "transformer"))


def loaded(checkpoint: Path, lora: LoraFactors, dtype: torch.dtype) -> torch.nn.Module:
    from serving.torch_components import load_module
    from serving.torch_lora import patch_lora

    module = load_module("transformer", checkpoint / "transformer", torch.device("cpu"), dtype)
    patch_lora(module, add=lora)
    return module


def ulps(weight: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|weight - ref| in bfloat16 units in the last place of the larger of the two."""
    big = torch.maximum(weight.abs(), ref.abs()).clamp(min=1e-30)
    return (weight - ref).abs() / 2.0 ** (torch.floor(torch.log2(big)) - 7)


def measure(checkpoint: Path, lora_a: Path, lora_b: Path) -> list[dict[str, float]]:
    from export.flux.onnx_export import transformer_inputs
    from serving.torch_components import TorchComponent
    from serving.torch_lora import patch_lora

    a, b = factors(checkpoint, lora_a), factors(checkpoint, lora_b)
    fresh = {"A": loaded(checkpoint, a, torch.bfloat16), "B": loaded(checkpoint, b, torch.bfloat16)}
    switched = loaded(checkpoint, a, torch.bfloat16)
    feeds = transformer_inputs(switched, 1, 16, 16, 32, seed=1)
    bf16 = TorchRuntime(device="cpu")

    def run(module: torch.nn.Module, runtime: TorchRuntime = bf16) -> np.ndarray:
        return TorchComponent(FLUX_TRANSFORMER, module, runtime)(feeds)

    outs = {k: run(m) for k, m in fresh.items()}
    fp32 = run(loaded(checkpoint, a, torch.float32), TorchRuntime(device="cpu", dtype="float32"))
    scale = {
        "bf16_vs_fp32": float(np.linalg.norm(outs["A"] - fp32) / np.linalg.norm(fp32)),
        "lora_a_vs_b": float(np.linalg.norm(outs["A"] - outs["B"]) / np.linalg.norm(outs["B"])),
    }
    rows, holds, done = [], "A", 0
    for target in SWITCHES:
        while done < target:
            new = "B" if holds == "A" else "A"
            patch_lora(switched, remove=a if holds == "A" else b, add=a if new == "A" else b)
            holds, done = new, done + 1
        errors = torch.cat(
            [
                ulps(
                    switched.get_submodule(layer).weight.float(), fresh[holds].get_submodule(layer).weight.float()
                ).flatten()
                for layer in a
            ]
        ).flatten()
        out = run(switched)
        rows.append(
            {
                "switches": done,
                "holds": holds,
                "weights_differing": float((errors > 0).float().mean()),
                "mean_ulp": float(errors.mean()),
                "max_ulp": float(errors.max()),
                "output_rel": float(np.linalg.norm(out - outs[holds]) / np.linalg.norm(outs[holds])),
                **scale,
            }
        )
    return rows


def table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| switches | holds | adapted weights differing | mean / max error (ulp) | output vs fresh load |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['switches']} | {r['holds']} | {r['weights_differing']:.1%} | {r['mean_ulp']:.2f} / "
            f"{r['max_ulp']:.0f} | {r['output_rel']:.1e} |"
        )
    r = rows[0]
    lines.append("")
    lines.append(
        f"For scale: bf16 vs float32, same LoRA: {r['bf16_vs_fp32']:.1e}; LoRA A vs LoRA B: {r['lora_a_vs_b']:.1e} "
        "(relative L2 of the transformer's output)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora_drift")
    parser.add_argument("--checkpoint", type=Path, default=BUILD_DIR / "flux" / "checkpoint-small-0")
    parser.add_argument("--lora", type=Path, default=BUILD_DIR / "flux" / "lora-small-0")
    parser.add_argument("--work-dir", type=Path, default=BUILD_DIR / "lora-drift")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from export.flux.lora import build_local_lora

    other = build_local_lora(args.checkpoint, args.work_dir / "lora-b", seed=11)
    sys.stdout.write(table(measure(args.checkpoint, args.lora, other)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
