"""What the training worker runs for a job: train, then (optionally) re-export and hot-swap, or,
for a LoRA job with publish=adapter, publish the LoRA into the adapter store (no model changes).

Tasks are registered on a huey instance by `register_tasks`, called identically by the facade
(which only enqueues) and the worker (which runs them), so no settings are read at import time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from huey.api import Huey

from contract.specs import JobKind
from training.jobs import ADAPTER_NAME_PARAM, PUBLISH_ADAPTER, JobSettings, JobStore, job_dir
from training.liveness import Heartbeat
from training.stores import job_store

log = logging.getLogger(__name__)

TASK_NAME = "fluxserve.run_job"


def _progress_writer(store: JobStore, job_id: str, min_interval_s: float = 0.2) -> Callable[[dict], None]:
    last = [0.0]

    def write(progress: dict) -> None:
        now = time.monotonic()
        final = progress.get("step") == progress.get("total_steps")
        if final or now - last[0] >= min_interval_s:  # bound SQLite writes on fast steps
            store.update(job_id, progress=progress)
            last[0] = now

    return write


def run_flux_lora(settings: JobSettings, store: JobStore, job_id: str, params: dict[str, Any]) -> dict[str, Any]:
    from export.flux_build import default_checkpoint
    from publish.flux import publish_and_swap
    from training.flux_lora import LoraTrainSettings, train_lora
    from training.lora_dataset import load_prepared

    jd = job_dir(settings, job_id)
    dataset = load_prepared(jd / "dataset")
    checkpoint = settings.base_checkpoint or str(default_checkpoint())
    manifest = train_lora(
        checkpoint,
        dataset,
        jd / "lora",
        LoraTrainSettings(**params["train"]),
        on_progress=_progress_writer(store, job_id),
        should_stop=lambda: store.cancel_requested(job_id),
    )
    # Paths in a job's result are relative to the job's folder: callers never see host paths.
    result: dict[str, Any] = {"lora_dir": "lora", "manifest": manifest}
    if params.get("publish", True) == PUBLISH_ADAPTER:
        result["publish"] = _publish(
            store, job_id, result, lambda: publish_lora_adapter(settings, store, job_id, params, checkpoint)
        )
    elif params.get("publish", True):
        result["publish"] = _publish(
            store,
            job_id,
            result,
            lambda: publish_and_swap(
                repo=settings.model_repository,
                lock=publish_lock(settings),
                lock_timeout_s=settings.publish_lock_timeout_s,
                triton_http_url=settings.triton_http_url,
                keep_versions=settings.keep_versions,
                checkpoint=checkpoint,
                lora=jd / "lora",
                lora_scale=1.0,  # the trainer bakes alpha/rank into the weights: full strength as trained
                trigger_word=params["trigger_word"],
            ),
        )
    return result


def publish_lora_adapter(
    settings: JobSettings, store: JobStore, job_id: str, params: dict[str, Any], checkpoint: str
) -> dict[str, Any]:
    """The job's LoRA into the adapter store under the name claimed at submit, owned by the job's
    owner: requests naming it use it from now on, and no model version changes. What the job's
    result says of it: its name and the sha256 that answers naming it carry."""
    from publish.adapters import publish_adapter

    job = store.get(job_id)
    record = publish_adapter(
        job_dir(settings, job_id) / "lora",
        params[ADAPTER_NAME_PARAM],
        trigger_words=params["trigger_word"],
        owner=job.owner if job is not None else None,
        scale=1.0,  # the trainer bakes alpha/rank into the weights: full strength as trained
        repository=settings.model_repository,
        base_checkpoint=checkpoint,
        source=f"job {job_id}",
    )
    return {"adapter": {"name": record.name, "sha256": record.sha256, "rank": record.rank}}


def _publish(
    store: JobStore, job_id: str, result: dict[str, Any], publish_fn: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The job's publish step: recorded as running, then succeeded, or failed with the reason
    (training's result is kept either way; the previous model version keeps serving).

    A cancel that arrived before this point wins (InterruptedError: nothing is published); from
    here on the job refuses cancels (409) until the publish has committed or rolled back."""
    if not store.begin_publish(job_id):
        raise InterruptedError("cancelled before publishing")
    store.update(job_id, result={**result, "publish": {"status": "running"}})
    try:
        published = publish_fn()
    except Exception as e:
        log.exception("publish failed for job %s", job_id)
        raise PublishError(str(e), {**result, "publish": {"status": "failed", "error": str(e)}}) from e
    finally:
        store.end_publish(job_id)
    return {"status": "succeeded", **published}


def publish_lock(settings: JobSettings) -> AbstractContextManager[object] | None:
    """With Redis, the cross-machine lock (the repository's file lock is always taken too)."""
    if not settings.redis_url:
        return None
    from publish.publish_lock import redis_lock
    from training.redis_jobs import PUBLISH_LOCK_KEY, redis_client

    return redis_lock(redis_client(settings.redis_url), PUBLISH_LOCK_KEY, timeout_s=settings.publish_lock_timeout_s)


def run_classifier(settings: JobSettings, store: JobStore, job_id: str, params: dict[str, Any]) -> dict[str, Any]:
    from publish.classifier import publish_and_swap_classifier, serving_classifier_accuracy
    from training.classifier import ClassifierTrainSettings, train_classifier

    jd = job_dir(settings, job_id)
    overrides = {k: v for k, v in params.get("train", {}).items() if v is not None}
    data_dir = jd / "data" if (jd / "data").is_dir() else None
    cls_settings = ClassifierTrainSettings(
        output_dir=jd / "model", **({"data_dir": data_dir} if data_dir else {}), **overrides
    )
    metrics = train_classifier(
        cls_settings, on_progress=_progress_writer(store, job_id), should_stop=lambda: store.cancel_requested(job_id)
    )
    result: dict[str, Any] = {"model_dir": "model", "test": metrics["test"], "validation": metrics["validation"]}
    if params.get("publish", True):
        _accuracy_gate(
            result,
            metrics["test"]["accuracy"],
            serving_classifier_accuracy(settings.model_repository, settings.triton_http_url),
        )

        def publish() -> dict[str, Any]:
            pub = publish_and_swap_classifier(
                jd / "model",
                settings.model_repository,
                settings.triton_http_url,
                work_dir=jd / "onnx",
                keep_versions=settings.keep_versions,
                lock=publish_lock(settings),
                lock_timeout_s=settings.publish_lock_timeout_s,
            )
            parity = float(pub["parity_max_abs_logit_error"])  # type: ignore[arg-type]
            precision = pub.get("precision") or {}
            return {
                "model_version": str(pub["classify"].version),  # type: ignore[union-attr]
                "parity_max_abs_logit_error": None if math.isnan(parity) else parity,
                "precision": precision.get("served", "fp32"),
                "precision_reason": precision.get("reason"),
            }

        result["publish"] = _publish(store, job_id, result, publish)
    return result


def _accuracy_gate(result: dict[str, Any], new: float, serving: float | None) -> None:
    """Publish only a classifier at least as accurate on the test split as the one serving; both
    figures go into the result either way. Unknown serving accuracy (nothing published with
    metrics yet) does not block."""
    result["accuracy_gate"] = {"test_accuracy": new, "serving_test_accuracy": serving}
    if serving is not None and new < serving:
        result["publish"] = {"status": "refused"}
        raise PublishError(
            f"test accuracy {new:.4f} is below the serving model's {serving:.4f}; the serving model is kept", result
        )


class PublishError(RuntimeError):
    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


Runner = Callable[[JobSettings, JobStore, str, dict[str, Any]], dict[str, Any]]
RUNNERS: dict[JobKind, Runner] = {"flux_lora": run_flux_lora, "classifier": run_classifier}


def run_job(settings: JobSettings, job_id: str, worker_id: str | None = None) -> None:
    """Run one job as `worker_id` (a worker's heartbeat id); without one (a job run in-process),
    a heartbeat of its own keeps the job alive for the reaper while it runs."""
    store = job_store(settings)
    if worker_id is None:
        with Heartbeat(store, settings) as beat:
            return _run_job(settings, store, job_id, beat.worker_id)
    return _run_job(settings, store, job_id, worker_id)


def _run_job(settings: JobSettings, store: JobStore, job_id: str, worker_id: str) -> None:
    if not store.start(job_id, worker_id):
        log.info("job %s is not queued any more (cancelled?); skipping", job_id)
        return
    job = store.get(job_id)
    assert job is not None
    log.info("job %s (%s) started on %s", job_id, job.kind, worker_id)
    try:
        result = RUNNERS[job.kind](settings, store, job_id, job.params)
    except InterruptedError:
        outcome = "cancelled", {"error": "cancelled by request"}
    except PublishError as e:
        outcome = "failed", {"result": e.result, "error": f"training succeeded but publishing failed: {e}"}
    except Exception as e:
        log.exception("job %s failed", job_id)
        outcome = "failed", {"error": f"{type(e).__name__}: {e}"}
    else:
        outcome = "succeeded", {"result": result}
    status, values = outcome
    if store.finish(job_id, worker_id, status, **values):
        log.info("job %s %s", job_id, status)
    else:  # the reaper took this worker for lost and failed the job meanwhile: that record stands
        after = store.record(job_id)
        log.warning(
            "job %s ended %s here, but its record is already %s (%s); not overwritten",
            job_id,
            status,
            after.status if after else "gone",
            after.error if after else "",
        )


def register_tasks(huey: Huey, settings: JobSettings, worker_id: str | None = None) -> Callable[[str], Any]:
    """Register the job task on `huey`; returns the enqueue function. The worker passes its
    heartbeat id; the facade (which only enqueues) passes none."""

    @huey.task(name=TASK_NAME)
    def _run(job_id: str) -> None:
        run_job(settings, job_id, worker_id)

    return _run
