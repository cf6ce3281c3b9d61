"""`fluxserve-client`: talk to Triton directly over gRPC, and to the facade's training API.

    fluxserve-client classify "can I see you in the kitchen?" "see you tomorrow"
    fluxserve-client generate "a red fox in snow" --width 256 --height 256 --steps 4 -o fox.png
    fluxserve-client train submit my_images.zip --trigger-word zxq --steps 40
    fluxserve-client train submit my_images.zip --trigger-word zxq --adapter --name my-dog
    fluxserve-client train list | get JOB_ID | cancel JOB_ID
    fluxserve-client loras list | show NAME | delete NAME
    fluxserve-client generate "zxq, a dog on a beach" --lora my-dog --lora-scale 0.8

The training and adapter commands need the operator key: --api-key, else $FLUXSERVE_API_KEY, else the file
`make up` created (.fluxserve/api_key). Prefer the variable or the file: a flag shows in `ps`.

`generate` shows a progress bar fed by `generate_stream` (one update per denoising step);
`--no-progress` uses the unary `generate` model instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from client.facade_client import API_KEY_ENV, DEFAULT_API_URL, KEY_FILE, FacadeClient, read_key_file
from client.triton_client import DEFAULT_URL, TritonClient
from contract.codec import GenerateResult
from contract.errors import FluxServeError
from contract.specs import DEFAULT_JOB_KIND, GENERATE_DEFAULTS, JOB_KINDS, GenerateParams

log = logging.getLogger("fluxserve.client")


def cli_params(args: argparse.Namespace) -> GenerateParams:
    """The command line's options as GenerateParams: every field the parser has, by name."""
    return GenerateParams.build(**{k: v for k, v in vars(args).items() if k in GenerateParams.model_fields})


def generate_with_progress(client: TritonClient, args: argparse.Namespace) -> GenerateResult:
    from tqdm import tqdm

    with tqdm(total=args.steps, unit="step", desc="generating", file=sys.stderr) as bar:
        for progress, result in client.generate_stream(cli_params(args)):
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
    g.add_argument("--lora", help="a published adapter's name (fluxserve-client loras list); default: none")
    g.add_argument("--lora-scale", type=float, help="the adapter's strength, 0-2 (default: the adapter's own)")
    g.add_argument("-o", "--output", type=Path, default=Path("image.png"))
    _add_train_commands(sub)
    _add_lora_commands(sub)
    g.add_argument("--no-progress", action="store_true", help="no progress bar: call the unary generate model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.cmd == "train":
        return _train(args)
    if args.cmd == "loras":
        return _loras(args)
    try:
        with TritonClient(args.url, args.timeout_s) as client:
            if args.cmd == "classify":
                results = client.classify(args.texts)
                json.dump([{"text": t, **asdict(r)} for t, r in zip(args.texts, results)], sys.stdout, indent=2)
                sys.stdout.write("\n")
            else:
                from PIL import Image

                if args.no_progress:
                    res = client.generate(cli_params(args))
                else:
                    res = generate_with_progress(client, args)
                Image.fromarray(res.image).save(args.output)
                log.info("wrote %s (seed %d, model version %s)", args.output, res.seed, res.model_version)
    except FluxServeError as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2
    return 0


def _add_facade_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-url", default=DEFAULT_API_URL, help="the facade's address")
    parser.add_argument("--api-key", help=f"operator key (default: ${API_KEY_ENV}, else {KEY_FILE})")


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="the facade's training API (needs the operator key)")
    _add_facade_options(t)
    actions = t.add_subparsers(dest="action", required=True)
    s = actions.add_parser("submit", help="start a job: a LoRA from a zip of images, or --kind classifier")
    s.add_argument("dataset", nargs="?", type=Path, help="zip of images (+ same-name .txt captions)")
    s.add_argument("--kind", choices=JOB_KINDS, default=DEFAULT_JOB_KIND)
    s.add_argument("--trigger-word")
    for name, kind in (
        ("steps", int),
        ("rank", int),
        ("learning-rate", float),
        ("resolution", int),
        ("seed", int),
        ("batch-size", int),
    ):
        s.add_argument(f"--{name}", type=kind)
    publish = s.add_mutually_exclusive_group()
    publish.add_argument("--no-publish", action="store_true", help="train only; do not serve the result")
    publish.add_argument(
        "--adapter",
        action="store_true",
        help="publish the LoRA as an adapter that requests name (--lora), not as a new model version",
    )
    s.add_argument("--name", help="the adapter's name with --adapter (default: the job id)")
    ls = actions.add_parser("list", help="recent jobs")
    ls.add_argument("--limit", type=int, default=20)
    for action in ("get", "cancel"):
        actions.add_parser(action).add_argument("job_id")


def _add_lora_commands(sub: argparse._SubParsersAction) -> None:
    lo = sub.add_parser("loras", help="the facade's published adapters (needs the operator key)")
    _add_facade_options(lo)
    actions = lo.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every published adapter")
    for action, text in (("show", "one adapter's record"), ("delete", "remove an adapter")):
        actions.add_parser(action, help=text).add_argument("name")


def _operator_key(args: argparse.Namespace) -> str | None:
    key = args.api_key or os.environ.get(API_KEY_ENV) or read_key_file()
    if not key:
        log.error("no operator key: pass --api-key, set %s, or run `make up` once to create %s", API_KEY_ENV, KEY_FILE)
    return key


def _print(out: object) -> int:
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _loras(args: argparse.Namespace) -> int:
    key = _operator_key(args)
    if not key:
        return 2
    try:
        with FacadeClient(args.api_url, api_key=key) as api:
            if args.action == "list":
                out = api.loras()
            elif args.action == "show":
                out = api.lora(args.name)
            else:
                out = api.delete_lora(args.name)
    except (FluxServeError, OSError) as e:
        log.error("%s", e)
        return 2
    return _print(out)


def _publish_choice(args: argparse.Namespace) -> bool | str:
    return "adapter" if args.adapter else not args.no_publish


def _train(args: argparse.Namespace) -> int:
    key = _operator_key(args)
    if not key:
        return 2
    try:
        with FacadeClient(args.api_url, api_key=key) as api:
            if args.action == "submit":
                params = {
                    "steps": args.steps,
                    "learning_rate": args.learning_rate,
                    "seed": args.seed,
                    "batch_size": args.batch_size,
                }
                if args.kind == "classifier":
                    out = api.submit_classifier(
                        epochs=params.pop("steps"),
                        publish=_publish_choice(args),
                        **{k: v for k, v in params.items() if v is not None},
                    )
                else:
                    if args.dataset is None or not args.trigger_word:
                        log.error("a LoRA job needs a dataset zip and --trigger-word")
                        return 2
                    out = api.submit_lora(
                        args.dataset,
                        args.trigger_word,
                        publish=_publish_choice(args),
                        name=args.name,
                        rank=args.rank,
                        resolution=args.resolution,
                        **params,
                    )
            elif args.action == "list":
                out = api.jobs(args.limit)
            elif args.action == "get":
                out = api.job(args.job_id)
            else:
                out = api.cancel(args.job_id)
    except FluxServeError as e:
        log.error("%s", e)
        return 2
    except OSError as e:
        log.error("%s", e)
        return 2
    return _print(out)


if __name__ == "__main__":
    sys.exit(main())
