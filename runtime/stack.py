"""`make up`: run Triton, the facade and the training worker in the foreground until Ctrl-C,
then stop all three cleanly.

Triton and the worker run under runtime.supervisor: either one dying is logged and restarted
with backoff while the facade keeps answering (503 + Retry-After until Triton is back). Ctrl-C
stops everything within about 10 s even with work in flight: the facade ends in-flight
generations at once with 503 + Retry-After (cancelling their Triton work) and waits up to
api.app.STOP_GRACE_S for the rest, then the worker and Triton get STOP_GRACE_S together before
they are killed.
"""

from __future__ import annotations

import logging
import signal
import sys

from api.app import serve
from api.keys import ensure_key_file
from api.request_id import configure_logging
from api.settings import ApiSettings
from api.worker_pool import supervise
from runtime.launcher import TritonServer, TritonStartError
from runtime.supervisor import Supervisor, TritonChild, worker_child

log = logging.getLogger("fluxserve.stack")
STOP_GRACE_S = 3


def announce_operator_key(settings: ApiSettings) -> None:
    """The training API needs an operator key: without FLUXSERVE_API_KEYS, make one in the key file
    once. Only the file's path is logged; whoever may read the file may use the key."""
    if settings.keys is not None:
        log.info("operator keys for /train from FLUXSERVE_API_KEYS")
        return
    created = ensure_key_file(settings.key_file)
    log.info(
        "operator key for /train %s %s (send it as 'Authorization: Bearer <key>'; docs/operations.md: Operator key)",
        "created in" if created else "in",
        settings.key_file,
    )


def main() -> int:
    configure_logging()
    # SIGTERM (docker stop, systemd, kill) stops the stack as Ctrl-C does. uvicorn re-raises the
    # signal after its own shutdown; with SIGTERM's default action that killed this process before
    # `finally` ran, leaving Triton and the worker orphaned (found by `kill <stack>`, issue 10 round).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    api_settings = ApiSettings()
    announce_operator_key(api_settings)
    triton = TritonServer()
    # The trainer is its own process: a training step must never stall the facade's event loop.
    supervisor = Supervisor([TritonChild(triton), worker_child({"FLUXSERVE_JOBS_TRITON_HTTP_URL": triton.http_url})])
    try:
        supervisor.start()
    except TritonStartError as e:
        log.error("%s", e)
        supervisor.stop(STOP_GRACE_S)
        return 1
    api_settings = api_settings.model_copy(update={"triton_grpc_url": triton.grpc_url})
    try:
        log.info(
            "facade on http://%s:%d (docs at /docs); Ctrl-C stops everything", api_settings.host, api_settings.port
        )
        # uvicorn handles SIGINT/SIGTERM itself (in-flight generations end with 503), then re-raises
        # the signal once it has shut down: that is the request to stop, not an error to print.
        try:
            if api_settings.workers > 1:  # several facade processes behind the port (api.worker_pool)
                status = supervise(api_settings)
                if status:
                    return status
            else:
                serve(api_settings)
        except KeyboardInterrupt:
            pass
        log.info("stopping the training worker and Triton")
    finally:
        supervisor.stop(STOP_GRACE_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
