"""The baseline: the prototype's architecture, for the benchmark to compare against.

One FastAPI process holds the models in PyTorch and runs them in-process, one request at a time
(a lock): a transformers `pipeline("text-classification")` on the fine-tuned classifier, and,
when generation is enabled, a diffusers `FluxPipeline` with the same checkpoint and LoRA fused.
It speaks the facade's public /classify and /generate contract so the load generator can drive
both with the same requests.

    python -m benchmarks.baseline_app --port 8090 --classifier-dir build/classifier/model [--generate]
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from common.chat_text import normalized, recorded_normalizer
from common.paths import CLASSIFIER_MODEL_DIR
from contract.specs import ENDPOINTS, GENERATE_DEFAULTS, LABELS

log = logging.getLogger(__name__)

DEFAULT_CLASSIFIER_DIR = CLASSIFIER_MODEL_DIR


class ClassifyBody(BaseModel):
    text: str | None = None
    texts: list[str] | None = None


class GenerateBody(BaseModel):
    prompt: str
    width: int = GENERATE_DEFAULTS.width
    height: int = GENERATE_DEFAULTS.height
    steps: int = GENERATE_DEFAULTS.steps
    guidance: float = GENERATE_DEFAULTS.guidance
    seed: int = 0
    num_images: int = Field(1, ge=1, le=4)
    output_format: str = "png"


def _classify_result(scores: list[dict[str, Any]]) -> dict[str, Any]:
    probs = {s["label"]: float(s["score"]) for s in scores}
    label = max(probs, key=probs.__getitem__)
    return {"label": label, "score": probs[label], "scores": probs}


def create_app(classifier_dir: Path = DEFAULT_CLASSIFIER_DIR, with_generate: bool = False) -> FastAPI:
    lock = threading.Lock()  # the prototype served one request at a time

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import torch
        from transformers import pipeline

        from export import classifier_network  # noqa: F401  (a mean-pooled classifier loads with its own head)

        app.state.classifier = pipeline("text-classification", model=str(classifier_dir), device="cpu", top_k=None)
        app.state.normalize = recorded_normalizer(Path(classifier_dir) / "labels.json")
        labels = tuple(app.state.classifier.model.config.id2label[i] for i in range(len(LABELS)))
        if labels != LABELS:
            raise RuntimeError(f"classifier labels {labels} do not match the contract {LABELS}")
        app.state.flux = None
        if with_generate:
            from benchmarks.flux_baseline import load_flux_pipeline

            app.state.flux, app.state.flux_source = load_flux_pipeline()
        app.state.info = {
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "generate": app.state.flux is not None,
        }
        log.info("baseline ready: %s", app.state.info)
        yield

    app = FastAPI(title="fluxserve baseline (prototype architecture)", lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, Any]:
        return {"ready": True, **app.state.info}

    # Plain `def` routes: FastAPI runs them on its thread pool, the lock serialises the models.
    @app.post("/classify")
    def classify(body: ClassifyBody) -> dict[str, Any]:
        texts = [body.text] if body.text is not None else list(body.texts or [])
        if not texts or any(not t or not t.strip() for t in texts):
            raise HTTPException(422, "give a non-empty 'text' or 'texts'")
        with lock:
            out = app.state.classifier(normalized(texts, app.state.normalize), truncation=True)
        results = [_classify_result(s) for s in out]
        return results[0] if body.text is not None else {"results": results}

    @app.post("/generate", response_model=None)
    def generate(body: GenerateBody) -> dict[str, Any] | JSONResponse:
        if app.state.flux is None:
            return JSONResponse(
                status_code=503, content={"error": {"type": "unavailable", "message": "generation is not enabled"}}
            )
        import torch

        source = app.state.flux_source
        prompt = body.prompt
        # The facade prepends the LoRA's trigger words too: the same text reaches both models.
        if source.trigger_word and source.trigger_word.lower() not in prompt.lower():
            prompt = f"{source.trigger_word}, {prompt}"
        with lock:
            images = app.state.flux(
                prompt=prompt,
                max_sequence_length=source.max_sequence_length,
                width=body.width,
                height=body.height,
                num_inference_steps=body.steps,
                guidance_scale=body.guidance,
                num_images_per_prompt=body.num_images,
                generator=torch.Generator("cpu").manual_seed(body.seed),
            ).images
        encoded = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format=body.output_format.upper())
            encoded.append(base64.b64encode(buf.getvalue()).decode())
        return {"images": encoded, "seed": body.seed, "model_version": "baseline"}

    return app


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=ENDPOINTS.host)
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--classifier-dir", type=Path, default=DEFAULT_CLASSIFIER_DIR)
    parser.add_argument("--generate", action="store_true", help="also load the FLUX pipeline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Same server settings as the facade (api.app.main), so the comparison is about architecture.
    uvicorn.run(
        create_app(args.classifier_dir, args.generate),
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=False,
    )


if __name__ == "__main__":
    main()
