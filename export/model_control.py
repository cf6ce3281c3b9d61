"""Loading and unloading models on a running Triton (explicit model-control mode)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import tritonclient.http as triton_http

log = logging.getLogger(__name__)


def load_models(http_url: str, names: Sequence[str], timeout_s: float = 900.0) -> None:
    """(Re)load models in order; each call makes Triton pick up new versions and configs.

    Triton loads a new version beside the serving one and switches only when it is ready;
    versions that fall out of the version policy unload after their in-flight requests finish.
    """
    client = triton_http.InferenceServerClient(http_url, network_timeout=timeout_s, connection_timeout=10.0)
    try:
        for name in names:
            log.info("loading %s on %s", name, http_url)
            client.load_model(name)
    finally:
        client.close()


def ready_versions(http_url: str, name: str) -> list[str]:
    client = triton_http.InferenceServerClient(http_url, connection_timeout=5.0)
    try:
        index = client.get_model_repository_index()
    finally:
        client.close()
    return sorted(
        (m.get("version", "") for m in index if m.get("name") == name and m.get("state") == "READY"),
        key=lambda v: int(v or 0),
    )
