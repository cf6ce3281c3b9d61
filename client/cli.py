"""`fluxserve-client`: talk to Triton directly over gRPC.

    fluxserve-client classify "can I see you in the kitchen?" "see you tomorrow"
    fluxserve-client generate "a red fox in snow" --width 256 --height 256 --steps 4 -o fox.png

`generate` shows a progress bar fed by `generate_stream` (one update per denoising step);
`--no-progress` uses the unary `generate` model instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from client.codec import GenerateResult
from client.contract import GENERATE_DEFAULTS
from client.errors import FluxServeError
from client.triton_client import DEFAULT_URL, TritonClient

log = logging.getLogger("fluxserve.client")


def generate_with_progress(client: TritonClient, args: argparse.Namespace) -> GenerateResult:
    from tqdm import tqdm

    with tqdm(total=args.steps, unit="step", desc="generating", file=sys.stderr) as bar:
        for progress, result in client.generate_stream(args.prompt, args.seed, args.width, args.height, args.steps, args.guidance):
            bar.total = progress.total
            bar.update(progress.step - bar.n)
            if result is not None:
                return result
    raise FluxServeError("the stream ended without an image")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluxserve-client", description="Direct Triton gRPC client")
    parser.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC address (host:port)")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("classify", help="classify chat messages")
    c.add_argument("texts", nargs="+")
    g = sub.add_parser("generate", help="generate an image")
    g.add_argument("prompt")
    g.add_argument("--seed", type=int)
    g.add_argument("--width", type=int, default=GENERATE_DEFAULTS.width)
    g.add_argument("--height", type=int, default=GENERATE_DEFAULTS.height)
    g.add_argument("--steps", type=int, default=GENERATE_DEFAULTS.steps)
    g.add_argument("--guidance", type=float, default=GENERATE_DEFAULTS.guidance)
    g.add_argument("-o", "--output", type=Path, default=Path("image.png"))
    g.add_argument("--no-progress", action="store_true", help="no progress bar: call the unary generate model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        with TritonClient(args.url, args.timeout_s) as client:
            if args.cmd == "classify":
                results = client.classify(args.texts)
                json.dump([{"text": t, **asdict(r)} for t, r in zip(args.texts, results)], sys.stdout, indent=2)
                sys.stdout.write("\n")
            else:
                from PIL import Image

                if args.no_progress:
                    res = client.generate(args.prompt, args.seed, args.width, args.height, args.steps, args.guidance)
                else:
                    res = generate_with_progress(client, args)
                Image.fromarray(res.image).save(args.output)
                log.info("wrote %s (seed %d, model version %s)", args.output, res.seed, res.model_version)
    except FluxServeError as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
