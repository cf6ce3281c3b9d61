"""POST /train with publish=adapter (issue 27), in-process (a real SQLite job store, a test
heartbeating for the worker, no worker: a queued job stays queued): the adapter's name is checked
and claimed before anything is queued (422 not a slug, 409 taken by a published adapter or by an
unfinished job), defaults to the job id, a job the served transformer could not take (no adapter
branch, a rank above its bank's) is a 422, and a classifier job cannot be published as one; true
and false keep meaning what they meant. What the worker does with such a job: tests/unit/test_adapter_jobs.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.adapter_bank import BankGroup, BankLayout
from contract.specs import FLUX_TRANSFORMER
from tests.unit.facade.harness import running_facade
from tests.unit.facade.test_http_loras import publish as publish_adapter
from tests.unit.facade.test_http_train import TRIGGER, Train, dataset, png, zipped
from training.jobs import ADAPTER_NAME_PARAM

pytestmark = pytest.mark.anyio


BANK_RANK = 8


def serve_bank(repository: Path, rank: int = BANK_RANK) -> None:
    """`repository`'s `flux_transformer` serves an adapter bank of rank `rank` (only its layout
    file: what POST /train reads of it)."""
    version = repository / FLUX_TRANSFORMER / "1"
    version.mkdir(parents=True, exist_ok=True)
    BankLayout(rank, "per_layer", (BankGroup("q", ("blocks.0.attn.to_q",), 8, 8),)).save(version)


@pytest.fixture
async def train(tmp_path: Path) -> AsyncIterator[Train]:
    spool = tmp_path / "spool"
    spool.mkdir()
    async with running_facade() as f:
        serve_bank(f.state.job_settings.model_repository)
        t = Train(f, spool)
        t.worker_alive()
        yield t


async def submit(train: Train, **fields: str):
    files = dataset(zipped({"a.png": png(), "b.png": png()}))
    return await train.facade.http.post("/train", data={"trigger_word": TRIGGER, **fields}, files=files)


async def test_publish_adapter_with_a_name(train: Train) -> None:
    r = await submit(train, publish="adapter", name="my-dog")
    assert r.status_code == 202, r.text
    job = (await train.facade.http.get(f"/train/{r.json()['job_id']}")).json()
    assert job["params"]["publish"] == "adapter" and job["params"][ADAPTER_NAME_PARAM] == "my-dog"


async def test_the_name_defaults_to_the_job_id(train: Train) -> None:
    r = await submit(train, publish="Adapter ")  # the choice, in any case and spacing
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    job = (await train.facade.http.get(f"/train/{job_id}")).json()
    assert job["params"]["publish"] == "adapter" and job["params"][ADAPTER_NAME_PARAM] == job_id


async def test_true_and_false_are_unchanged(train: Train) -> None:
    for value, expected in (("true", True), ("false", False), ("0", False), ("yes", True)):
        r = await submit(train, publish=value)
        assert r.status_code == 202, r.text
        params = (await train.facade.http.get(f"/train/{r.json()['job_id']}")).json()["params"]
        assert params["publish"] is expected and ADAPTER_NAME_PARAM not in params
    r = await submit(train)
    params = (await train.facade.http.get(f"/train/{r.json()['job_id']}")).json()["params"]
    assert params["publish"] is True


async def test_a_published_name_is_409_and_nothing_is_queued(train: Train) -> None:
    publish_adapter(train.facade, "my-dog")
    ids, disk = train.job_ids(), train.on_disk()
    r = await submit(train, publish="adapter", name="my-dog")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["type"] == "conflict" and "'my-dog'" in r.json()["error"]["message"]
    train.assert_nothing_left(ids, disk)


async def test_a_name_an_unfinished_job_will_publish_is_409(train: Train) -> None:
    first = await submit(train, publish="adapter", name="my-dog")
    assert first.status_code == 202
    ids, disk = train.job_ids(), train.on_disk()
    r = await submit(train, publish="adapter", name="my-dog")
    assert r.status_code == 409 and "'my-dog'" in r.json()["error"]["message"]
    train.assert_nothing_left(ids, disk)
    # A finished job claims nothing: the name is free again (until its adapter is published).
    store = train.facade.state.jobs
    assert store.start(first.json()["job_id"], "test-worker")
    assert store.finish(first.json()["job_id"], "test-worker", "failed", error="x")
    assert (await submit(train, publish="adapter", name="my-dog")).status_code == 202


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"publish": "adapter", "name": "My Dog"}, "name: adapter name 'My Dog' is not a slug"),
        ({"publish": "adapter", "name": "../dog"}, "is not a slug"),
        ({"publish": "adapter", "name": "-dog"}, "is not a slug"),
        ({"publish": "adapter", "name": "x" * 65}, "longer than 64"),
        ({"publish": "true", "name": "my-dog"}, "name: only with publish=adapter"),
        ({"name": "my-dog"}, "name: only with publish=adapter"),
        ({"publish": "adapters"}, "publish: must be true, false or adapter"),
    ],
)
async def test_bad_adapter_fields_are_422(train: Train, fields: dict, fragment: str) -> None:
    ids, disk = train.job_ids(), train.on_disk()
    r = await submit(train, **fields)
    assert r.status_code == 422 and fragment in r.json()["error"]["message"], r.text
    train.assert_nothing_left(ids, disk)


async def test_a_transformer_without_an_adapter_branch_refuses_adapter_jobs(train: Train) -> None:
    repo = train.facade.state.job_settings.model_repository
    (repo / FLUX_TRANSFORMER / "1" / "adapter_bank.json").unlink()
    ids, disk = train.job_ids(), train.on_disk()
    r = await submit(train, publish="adapter", name="my-dog")
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert message.startswith("publish: adapter is not served here: ") and "no adapter branch" in message
    assert str(repo) not in message
    train.assert_nothing_left(ids, disk)
    assert (await submit(train, publish="true")).status_code == 202  # the other choices are unaffected


async def test_a_rank_above_the_served_banks_is_422(train: Train) -> None:
    ids, disk = train.job_ids(), train.on_disk()
    r = await submit(train, publish="adapter", rank=str(BANK_RANK + 1))
    assert r.status_code == 422, r.text
    assert (
        r.json()["error"]["message"]
        == f"rank: at most {BANK_RANK} with publish=adapter (the served adapter bank's rank), got {BANK_RANK + 1}"
    )
    train.assert_nothing_left(ids, disk)
    assert (await submit(train, publish="adapter", rank=str(BANK_RANK))).status_code == 202
    assert (await submit(train, publish="true", rank=str(BANK_RANK + 1))).status_code == 202


async def test_a_classifier_is_never_an_adapter(train: Train) -> None:
    ids, disk = train.job_ids(), train.on_disk()
    for fields in ({"publish": "adapter"}, {"publish": "adapter", "name": "cls"}):
        r = await train.facade.http.post("/train", data={"kind": "classifier", "steps": "1", **fields})
        assert r.status_code == 422 and "publish: adapter is for flux_lora jobs" in r.json()["error"]["message"]
    r = await train.facade.http.post("/train", data={"kind": "classifier", "steps": "1", "name": "cls"})
    assert r.status_code == 422 and "name: only with publish=adapter" in r.json()["error"]["message"]
    train.assert_nothing_left(ids, disk)
