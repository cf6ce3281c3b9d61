"""A LoRA job with publish=adapter (issue 27) as the worker runs it (training.tasks), on the tiny
FLUX: the trained LoRA goes into the adapter store under the name claimed at submit, owned by the
job's owner, and the job's result says its name and sha256; no model version is written. A name
taken between submit and publish fails the publish step, not the training. Training itself is
stood in for by copying a LoRA trained for the tiny model (its own tests: test_flux_lora.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.adapter_bank import BankLayout  # noqa: E402
from common.adapter_store import adapters_dir, read_adapter_record  # noqa: E402
from common.flux_assets import LORA_WEIGHT_NAME  # noqa: E402
from contract.specs import FLUX_TRANSFORMER  # noqa: E402
from export.fingerprints import sha256_file  # noqa: E402
from training.jobs import ADAPTER_NAME_PARAM, PUBLISH_ADAPTER, JobSettings, SqliteJobStore  # noqa: E402
from training.tasks import _run_job  # noqa: E402

WORKER = "test-worker"


@pytest.fixture(scope="module")
def layout(tiny_checkpoint: Path) -> BankLayout:
    from diffusers import FluxTransformer2DModel

    from export.flux.lora import lora_target_modules
    from export.flux_build import base_transformer_fingerprint

    transformer = FluxTransformer2DModel.from_pretrained(tiny_checkpoint / "transformer")
    return BankLayout.build(
        lora_target_modules(transformer), 8, "grouped", base_transformer_fingerprint(tiny_checkpoint)
    )


@pytest.fixture
def settings(tmp_path: Path, layout: BankLayout, tiny_checkpoint: Path) -> JobSettings:
    repo = tmp_path / "model_repository"
    (repo / FLUX_TRANSFORMER / "1").mkdir(parents=True)
    layout.save(repo / FLUX_TRANSFORMER / "1")
    return JobSettings(jobs_dir=tmp_path / "jobs", model_repository=repo, base_checkpoint=str(tiny_checkpoint))


@pytest.fixture(autouse=True)
def trained_instantly(monkeypatch: pytest.MonkeyPatch, tiny_lora: Path) -> None:
    """train_lora writes the tiny model's LoRA where the job's would go; no dataset is read."""
    import training.flux_lora
    import training.lora_dataset

    def train_lora(checkpoint: str, dataset: object, out_dir: Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        shutil.copytree(tiny_lora, out_dir)
        return {"trigger_word": "zxq", "base_checkpoint": checkpoint}

    monkeypatch.setattr(training.flux_lora, "train_lora", train_lora)
    monkeypatch.setattr(training.lora_dataset, "load_prepared", lambda folder: None)


def adapter_job(store: SqliteJobStore, name: str) -> str:
    params = {"train": {}, "trigger_word": "zxq", "publish": PUBLISH_ADAPTER, ADAPTER_NAME_PARAM: name}
    job = store.create("flux_lora", params, owner="alice")
    store.mark_queued(job.id)
    return job.id


def tree(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))


def test_the_job_publishes_an_adapter_and_no_model(settings: JobSettings, tiny_lora: Path) -> None:
    store = SqliteJobStore(settings)
    models_before = tree(settings.model_repository)
    job_id = adapter_job(store, "my-dog")
    _run_job(settings, store, job_id, WORKER)

    job = store.get(job_id)
    assert job is not None and job.status == "succeeded", job
    sha = sha256_file(tiny_lora / LORA_WEIGHT_NAME)
    assert job.result["publish"] == {"status": "succeeded", "adapter": {"name": "my-dog", "sha256": sha, "rank": 4}}
    assert job.phase == "published"
    record = read_adapter_record(adapters_dir(settings.model_repository), "my-dog")
    assert (record.owner, record.trigger_words, record.sha256, record.scale) == ("alice", "zxq", sha, 1.0)
    assert record.source == f"job {job_id}"  # never a host path
    assert tree(settings.model_repository) == models_before


def test_a_name_taken_before_publishing_fails_the_publish_not_the_training(settings: JobSettings) -> None:
    store = SqliteJobStore(settings)
    first, second = adapter_job(store, "my-dog"), adapter_job(store, "my-dog")
    _run_job(settings, store, first, WORKER)
    _run_job(settings, store, second, WORKER)
    job = store.get(second)
    assert job is not None and job.status == "failed"
    assert job.error.startswith("training succeeded but publishing failed: an adapter named 'my-dog' already exists")
    assert job.result["publish"]["status"] == "failed" and job.result["lora_dir"] == "lora"
    assert read_adapter_record(adapters_dir(settings.model_repository), "my-dog").source == f"job {first}"
