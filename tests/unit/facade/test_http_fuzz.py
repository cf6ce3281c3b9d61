"""Schemathesis against the facade in-process (schemathesis.openapi.from_asgi: its ASGI client
runs the app's lifespan), from the facade's own OpenAPI, with a fake Triton behind it.

Every route is fuzzed and no answer may be a 5xx (`not_a_server_error`), with one documented
exception: /readyz answers a deliberate 503 while a required model is not ready (that is its job),
so it is checked for 200 or 503 with its body instead. The fake makes generation free, so /generate
and /chat are fuzzed with valid bodies too (the real-facade version could not afford one);
negative data to them must be refused with a 4xx, never run. POST /train is fuzzed without the
key: refused 401 (or 429 past the wrong-key burst) before its body is read. Moved here from
tests/integration/test_fuzz_facade.py, which keeps /classify's valid bodies against the real
classifier. Example counts are small; raise FLUXSERVE_FUZZ_EXAMPLES for a deeper run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, assume, given, settings
from pydantic import ValidationError
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from api.app import create_app
from api.schemas import ChatRequest, GenerateRequest
from tests.unit.facade.fake_triton import FakeTriton, fake_factory
from tests.unit.facade.harness import BASE_URL, KEY, facade_settings

EXAMPLES = int(os.environ.get("FLUXSERVE_FUZZ_EXAMPLES", "10"))
AUTH = {"Authorization": f"Bearer {KEY}"}
HOST = {"Host": "127.0.0.1"}
"""Schemathesis' ASGI client says `testserver`, which the Host check (rightly) refuses."""
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
BOTH = (POSITIVE, NEGATIVE)
# (path, method, generation modes, send the key, examples per mode)
ROUTES = [
    ("/classify", "POST", BOTH, False, EXAMPLES),
    ("/generate", "POST", BOTH, False, EXAMPLES),
    ("/chat", "POST", BOTH, False, EXAMPLES),
    ("/train", "GET", BOTH, True, EXAMPLES),
    ("/train/{job_id}", "GET", BOTH, True, EXAMPLES),
    ("/train/{job_id}", "DELETE", BOTH, True, EXAMPLES),
    ("/train/{job_id}/events", "GET", BOTH, True, EXAMPLES),
    ("/train", "POST", BOTH, False, 5),
    ("/loras", "GET", BOTH, True, EXAMPLES),
    ("/loras/{name}", "GET", BOTH, True, EXAMPLES),
    ("/loras/{name}", "DELETE", BOTH, True, EXAMPLES),
    ("/healthz", "GET", (POSITIVE,), False, 3),
    ("/readyz", "GET", (POSITIVE,), False, 3),
    ("/metrics", "GET", (POSITIVE,), False, 3),
]
SERVED = {("/classify", "POST"), ("/generate", "POST"), ("/train", "GET"), ("/healthz", "GET")}
"""Routes where valid data must get some 2xx: the fuzzing reached the handlers (not, say, only the
Host check's 400s). Not /chat: its default image (1024x1024, 28 steps) is over a CPU deployment's
cost limit, so nearly every valid message is a 422 here."""
SPENDING = {"/generate": GenerateRequest, "/chat": ChatRequest}
"""Routes whose valid bodies start a generation: negative data must never be run."""


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    from schemathesis.python.asgi import shutdown_lifespans

    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FLUXSERVE_JOBS_JOBS_DIR", str(root / "jobs"))
        env.setenv("FLUXSERVE_JOBS_MODEL_REPOSITORY", str(root / "model_repository"))  # its adapters: none
        env.delenv("FLUXSERVE_JOBS_REDIS_URL", raising=False)
        app = create_app(
            facade_settings(key_file=Path("/nonexistent/fluxserve-key")), triton=fake_factory(FakeTriton())
        )
    yield schemathesis.openapi.from_asgi("/openapi.json", app, headers=HOST)
    shutdown_lifespans()  # the app's lifespan ran in schemathesis' event-loop thread


def test_every_route_is_fuzzed(api_schema) -> None:
    served = {(op.ok().path, op.ok().method.upper()) for op in api_schema.get_all_operations()}
    assert served == {(path, method) for path, method, *_ in ROUTES}


def _valid_body(model: type[GenerateRequest] | type[ChatRequest], body: object) -> bool:
    try:
        model.model_validate(body)
    except ValidationError:
        return False
    return True


def _check(path: str, case, mode: GenerationMode, with_key: bool) -> int:
    """The status of one fuzzed request, after the checks."""
    if path == "/readyz":
        # The deliberate 503: "not ready" is an answer, not a failure of the facade.
        response = case.call(base_url=BASE_URL, headers=HOST)
        assert response.status_code in (200, 503) and "ready" in response.json(), response.text
        return response.status_code
    negative_spend = path in SPENDING and mode is NEGATIVE
    if negative_spend:
        # "Negative" data can still be a valid body (the negation hit something the route ignores).
        assume(not _valid_body(SPENDING[path], case.body))
    headers = {**HOST, **(AUTH if with_key else {})}
    response = case.call_and_validate(base_url=BASE_URL, headers=headers, checks=[not_a_server_error])
    if path == "/train" and case.method == "POST":
        # Refused before its body is read: 401, or 429 once this client's wrong keys (fuzzed
        # Authorization headers) pass the burst (api/auth_limit.py).
        assert response.status_code in (401, 429), response.text
    if negative_spend:
        assert 400 <= response.status_code < 500, response.text  # refused, never run
    return response.status_code


@pytest.mark.parametrize(
    ("path", "method", "modes", "with_key", "examples"), ROUTES, ids=[f"{m} {p}" for p, m, *_ in ROUTES]
)
def test_fuzz(
    api_schema, path: str, method: str, modes: tuple[GenerationMode, ...], with_key: bool, examples: int
) -> None:
    operation = api_schema[path][method]
    statuses: list[int] = []
    for mode in modes:
        # No shrinking: a failure is reported as generated.
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            statuses.append(_check(path, case, mode, with_key))

        run()
    if (path, method) in SERVED:
        assert any(200 <= s < 300 for s in statuses), statuses
