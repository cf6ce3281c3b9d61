"""Facade settings. Environment prefix: FLUXSERVE_API_ (read when the app is created)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from api.host_check import LOOPBACK_HOSTS
from client.facade_client import KEY_FILE
from common.paths import PROJECT_ROOT
from contract.specs import DEFAULT_TRIGGER_WORD, ENDPOINTS

DEFAULT_KEY_FILE = PROJECT_ROOT / KEY_FILE


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_API_")

    host: str = ENDPOINTS.host
    port: int = ENDPOINTS.api_port
    workers: int = Field(1, ge=1)
    """Facade processes behind the one port (api/worker_pool.py: SO_REUSEPORT, each with its share
    of every limit). One facade is one event loop; more take more cores under a storm of small
    requests (docs/benchmarks.md has what 2 did on 2 cores)."""
    triton_grpc_url: str = f"{ENDPOINTS.host}:{ENDPOINTS.triton_grpc_port}"
    triton_metrics_url: str | None = f"http://{ENDPOINTS.host}:{ENDPOINTS.triton_metrics_port}/metrics"
    """Triton's metrics, read at each /metrics scrape that presents the operator key for the prompt cache's
    counters (api/triton_metrics.py; without the key /metrics leaves them out); unset (empty) to never read them."""
    triton_metrics_timeout_s: float = 1.0
    classify_timeout_s: float = 10.0
    classify_calls_inflight: int = Field(2, ge=0)
    """Triton `classify` calls the facade keeps out at once; concurrent /classify requests that
    arrive meanwhile share the next call (api/classify_batcher.py). 0: one call per request."""
    generate_timeout_s: float = 600.0
    required_models: tuple[str, ...] = ("classify", "generate")
    """Models that must be ready for /readyz to answer 200."""
    ready_probe_interval_s: float = 10.0
    """/readyz wants an inference through each required model within this long: a real request,
    else a tiny probe (api/readiness.py)."""
    classify_threshold: float | None = None
    """Overrides the uncertainty threshold the deployed classifier was published with."""
    trigger_word: str = DEFAULT_TRIGGER_WORD
    """Used when the deployed generate model does not say which trigger words its LoRA has."""
    add_trigger_word: bool = True
    """Prepend the LoRA's trigger words to prompts that lack them (case-insensitive check)."""
    access_log: bool = False
    """One log line per request. Off by default: at full /classify load it costs the facade CPU
    (docs/decisions/classify-facade-overhead.md), and the Prometheus counters at /metrics carry the
    same counts by route and status."""
    opentelemetry: bool = False
    """FastAPI's native OpenTelemetry instrumentation (traces, metrics, logs to the globally configured
    providers). Off by default: its per-request checks cost the facade CPU at full /classify load
    (docs/decisions/classify-facade-overhead.md), and the Prometheus metrics at /metrics need nothing
    from it."""
    keys: SecretStr | None = None
    """FLUXSERVE_API_KEYS: operator keys, comma-separated, each `key` or `name:key` (the name is
    recorded as a job's owner). Several at once allow rotation. Unset: the key file below."""
    key_file: Path = DEFAULT_KEY_FILE
    """Read when FLUXSERVE_API_KEYS is unset; `make up` creates it (mode 0600) when missing. A file that
    group or others may read is refused (the facade does not start)."""
    auth_failure_burst: int = Field(10, ge=1)
    """Wrong operator keys a client (IP address, IPv6 /64) may present at once before it is answered 429."""
    auth_failure_refill_s: float = Field(6.0, gt=0)
    """After the burst, one more wrong key every this many seconds (api/auth_limit.py)."""
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = LOOPBACK_HOSTS
    """FLUXSERVE_API_ALLOWED_HOSTS: comma-separated names the Host header may carry (any port); others get
    400 (api/host_check.py: DNS rebinding). The bind address, when it is one address, is always allowed;
    `*` switches the check off."""
    require_key_for_inference: bool = False
    """Require the operator key on /classify and /generate too (they are open by default: loopback)."""
    max_json_body_bytes: int = Field(1024 * 1024, gt=0)
    """Largest request body on every route but POST /train (whose limit is FLUXSERVE_JOBS_MAX_UPLOAD_BYTES);
    a larger declared Content-Length is refused with 413 before any of it is read."""
    max_concurrent_uploads: int = Field(4, ge=1)
    """POST /train uploads this facade streams and validates at once; one more is answered 503 with
    Retry-After before its body is read (each holds up to the upload limit on disk and a decode thread)."""
    header_timeout_s: float = Field(10.0, gt=0)
    """A request's headers must arrive within this long (of its first byte, or of the connection's
    opening), else the connection is closed without an answer (api/slow_clients.py: slowloris)."""
    body_timeout_s: float = Field(30.0, gt=0)
    body_min_bytes_per_s: float = Field(64 * 1024, gt=0)
    """A body must arrive within body_timeout_s plus its declared length at this rate, else the
    connection is closed (the handler sees a disconnect)."""
    max_connections: int = Field(8192, ge=1)
    """Open connections at most; one more is closed when accepted (the client sees a reset). Held
    refusals (api/shedding.py) keep connections open for up to half a second each, hence the room."""
    min_free_disk_mb: int = Field(1024, ge=0)
    """POST /train answers 507 before reading the body while the jobs folder's filesystem has less free."""

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return tuple(p.strip() for p in value.split(",") if p.strip()) if isinstance(value, str) else value
