"""Several facade processes share the deployment's limits (api/worker_pool.py): each enforces its
part, so N processes never admit N times what one would. The processes themselves, for real:
tests/integration/test_facade_workers.py."""

from __future__ import annotations

import asyncio

from api.admission import Admission, AdmissionSettings, ModelFacts
from api.settings import ApiSettings
from api.worker_pool import per_worker, share, worker_env
from contract.cost import TransformerShape

GIB = 2**30


def test_a_share_rounds_down_but_never_to_nothing() -> None:
    assert share(8192, 2) == 4096
    assert share(4, 3) == 1  # 3 processes with 1 upload each: 3, within the deployment's 4
    assert share(1, 4) == 1  # a process that may admit nothing would refuse everything
    assert share(10, 1) == 10


def test_one_process_keeps_its_settings_and_several_split_the_limits() -> None:
    alone = ApiSettings(max_connections=8192, max_concurrent_uploads=4, auth_failure_burst=10)
    assert per_worker(alone) is alone
    two = per_worker(alone.model_copy(update={"workers": 2}))
    assert (two.max_connections, two.max_concurrent_uploads, two.auth_failure_burst) == (4096, 2, 5)
    assert two.classify_timeout_s == alone.classify_timeout_s  # what is not a limit is unchanged


def test_admission_takes_its_share_of_slots_memory_and_the_batch_floor() -> None:
    async def facts() -> ModelFacts:
        return ModelFacts(on_gpu=False, shape=TransformerShape(), triton_slots=8)

    settings = AdmissionSettings(generate_memory_budget_mb=4096, classify_floor_texts=64)
    one, two = Admission(settings, facts), Admission(settings, facts, workers=2)
    f = asyncio.run(one.facts())
    asyncio.run(two.facts())
    assert (one.dispatch.capacity, two.dispatch.capacity) == (8, 4)
    assert (one.memory_budget_bytes(f), two.memory_budget_bytes(f)) == (4 * GIB, 2 * GIB)
    # One full Triton batch across the processes: Triton's dynamic batcher merges their calls.
    assert (one.classify.floor, two.classify.floor) == (64, 32)
    assert two.classify.capacity() == one.classify.capacity() / 2  # until each measures its own


def test_workers_are_told_the_address_and_triton_the_caller_chose() -> None:
    s = ApiSettings(port=9123, triton_grpc_url="127.0.0.1:9001", workers=2)
    assert worker_env(s) == {
        "FLUXSERVE_API_HOST": s.host,
        "FLUXSERVE_API_PORT": "9123",
        "FLUXSERVE_API_TRITON_GRPC_URL": "127.0.0.1:9001",
    }
