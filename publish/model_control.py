"""Loading and unloading models on a running Triton (explicit model-control mode). Every call sends
the control key (client.control_key): Triton refuses model control without it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import tritonclient.http as triton_http

from client.control_key import control_headers

log = logging.getLogger(__name__)


def load_models(http_url: str, names: Sequence[str | tuple[str, ...]], timeout_s: float = 900.0) -> None:
    """(Re)load models in order; each call makes Triton pick up new versions and configs. A
    tuple of names is one step whose models load at the same time (none of them calls another).

    Triton loads a new version beside the serving one and switches only when it is ready;
    versions that fall out of the version policy unload after their in-flight requests finish.
    """
    for step in names:
        group = (step,) if isinstance(step, str) else tuple(step)
        if len(group) == 1:
            _load(http_url, group[0], timeout_s)
            continue
        with ThreadPoolExecutor(len(group)) as pool:
            for future in [pool.submit(_load, http_url, name, timeout_s) for name in group]:
                future.result()  # the first failure propagates, after every load has ended


def _load(http_url: str, name: str, timeout_s: float) -> None:
    client = triton_http.InferenceServerClient(http_url, network_timeout=timeout_s, connection_timeout=10.0)
    try:
        log.info("loading %s on %s", name, http_url)
        client.load_model(name, headers=control_headers())
    finally:
        client.close()


def ready_versions(http_url: str, name: str) -> list[str]:
    client = triton_http.InferenceServerClient(http_url, connection_timeout=5.0)
    try:
        index = client.get_model_repository_index(headers=control_headers())
    finally:
        client.close()
    return sorted(
        (m.get("version", "") for m in index if m.get("name") == name and m.get("state") == "READY"),
        key=lambda v: int(v or 0),
    )
