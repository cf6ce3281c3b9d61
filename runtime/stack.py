"""`make up`: run Triton, the facade and the training worker in the foreground until Ctrl-C,
then stop all three cleanly."""

from __future__ import annotations

import logging
import sys

import uvicorn

from api.app import create_app
from api.auth import ensure_key_file
from api.request_id import configure_logging
from api.settings import ApiSettings
from runtime.launcher import TritonServer, TritonStartError
from training.worker import running_worker

log = logging.getLogger("fluxserve.stack")


def announce_operator_key(settings: ApiSettings) -> None:
    """The training API needs an operator key: without FLUXSERVE_API_KEYS, make one in the key file
    once. Only the file's path is logged; whoever may read the file may use the key."""
    if settings.keys is not None:
        log.info("operator keys for /train from FLUXSERVE_API_KEYS")
        return
    created = ensure_key_file(settings.key_file)
    log.info("operator key for /train %s %s (send it as 'Authorization: Bearer <key>'; README: Operator key)",
             "created in" if created else "in", settings.key_file)


def main() -> int:
    configure_logging()
    api_settings = ApiSettings()
    announce_operator_key(api_settings)
    triton = TritonServer()
    try:
        triton.start()
    except TritonStartError as e:
        log.error("%s", e)
        return 1
    api_settings = api_settings.model_copy(update={"triton_grpc_url": triton.grpc_url})
    try:
        # The trainer is its own process: a training step must never stall the facade's event loop.
        with running_worker({"FLUXSERVE_JOBS_TRITON_HTTP_URL": triton.http_url}):
            log.info("facade on http://%s:%d (docs at /docs); Ctrl-C stops everything", api_settings.host, api_settings.port)
            # uvicorn handles SIGINT/SIGTERM itself and returns; then the worker and Triton stop in order.
            uvicorn.run(create_app(api_settings), host=api_settings.host, port=api_settings.port, log_level="info",
                        access_log=api_settings.access_log, log_config=None)
            log.info("stopping the training worker and Triton")
    finally:
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
