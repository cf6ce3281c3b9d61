"""Facade settings. Environment prefix: FLUXSERVE_API_ (read when the app is created)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from client.contract import DEFAULT_TRIGGER_WORD, ENDPOINTS


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_API_")

    host: str = ENDPOINTS.host
    port: int = ENDPOINTS.api_port
    triton_grpc_url: str = f"{ENDPOINTS.host}:{ENDPOINTS.triton_grpc_port}"
    classify_timeout_s: float = 10.0
    generate_timeout_s: float = 600.0
    required_models: tuple[str, ...] = ("classify", "generate")
    """Models that must be ready for /readyz to answer 200."""
    classify_threshold: float | None = None
    """Overrides the uncertainty threshold the deployed classifier was published with."""
    trigger_word: str = DEFAULT_TRIGGER_WORD
    """Used when the deployed generate model does not say which trigger words its LoRA has."""
    add_trigger_word: bool = True
    """Prepend the LoRA's trigger words to prompts that lack them (case-insensitive check)."""
    access_log: bool = False
    """One log line per request. Off by default: at full /classify load it costs ~7% of the facade's
    CPU, and the Prometheus counters at /metrics carry the same counts by route and status."""
    max_concurrent_generations: int = 16
    """Generations in flight through this facade; beyond it requests wait, bounding memory."""
