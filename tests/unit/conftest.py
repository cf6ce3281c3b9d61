"""Session fixtures shared by the FLUX unit tests: the tiny local checkpoint, its LoRA and the fused
pipeline. The builds are idempotent and live under pytest's base temp folder, so every module
reuses the first build."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from common.flux_assets import LORA_WEIGHT_NAME
from contract.specs import PROMPT_CACHE_METRIC
from export.flux.checkpoint import build_local_flux
from export.flux.lora import build_local_lora, load_pipeline


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_local_flux(tmp_path_factory.getbasetemp() / "flux-tiny-0", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_lora(tiny_checkpoint: Path) -> Path:
    out = tiny_checkpoint.parent / "flux-tiny-0-lora"
    return out if (out / LORA_WEIGHT_NAME).exists() else build_local_lora(tiny_checkpoint, out)


@pytest.fixture(scope="session")
def fused_pipeline(tiny_checkpoint: Path, tiny_lora: Path):
    return load_pipeline(tiny_checkpoint, tiny_lora)


PROMPT_CACHE_SAMPLE = (
    f"# HELP {PROMPT_CACHE_METRIC} lookups\n# TYPE {PROMPT_CACHE_METRIC} counter\n"
    f'{PROMPT_CACHE_METRIC}{{result="hit"}} 3\n{PROMPT_CACHE_METRIC}{{result="miss"}} 1\n'
).encode()
"""What a Triton /metrics page says of the prompt cache: 3 hits, 1 miss."""


@pytest.fixture
def triton_metrics_url() -> Iterator[str]:
    """A stand-in Triton metrics endpoint serving PROMPT_CACHE_SAMPLE, for the facade's /metrics."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PROMPT_CACHE_SAMPLE)))
            self.end_headers()
            self.wfile.write(PROMPT_CACHE_SAMPLE)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()
