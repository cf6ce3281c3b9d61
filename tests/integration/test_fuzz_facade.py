"""Schemathesis against the real facade (real Triton behind it), from the facade's own OpenAPI.

Every route is fuzzed and no answer may be a 5xx (`not_a_server_error`), with one documented
exception: /readyz answers a deliberate 503 while a required model is not ready (that is its job),
so it is checked for 200 or 503 with its body instead.
- /classify: positive and negative data (each positive case runs the real classifier);
- /generate: negative data only (a positive case can cost minutes of CPU: see the reliability issue);
- GET/DELETE /train: with the operator key (ids that do not exist: nothing is cancelled);
  POST /train: without it (every case is refused 401 before its body is read, so nothing trains).
Example counts are small to keep the suite fast; raise FLUXSERVE_FUZZ_EXAMPLES for a deeper run.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

from tests.conftest import TEST_API_KEY, Facade

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FLUXSERVE_FUZZ_EXAMPLES", "15"))
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
CHECKS = [not_a_server_error]


def _schema(facade: Facade, mode: str, examples: int = EXAMPLES):
    config = SchemathesisConfig.from_dict({"generation": {"max-examples": examples, "mode": mode}})
    return schemathesis.openapi.from_url(f"{facade.url}/openapi.json", config=config)


@pytest.fixture(scope="module")
def classify_schema(facade: Facade):
    return _schema(facade, "all").include(path="/classify")


@pytest.fixture(scope="module")
def generate_schema(facade: Facade):
    return _schema(facade, "negative").include(path="/generate")


@pytest.fixture(scope="module")
def train_read_schema(facade: Facade):
    return _schema(facade, "all").include(path_regex="^/train").exclude(method="POST")


@pytest.fixture(scope="module")
def train_post_schema(facade: Facade):
    return _schema(facade, "all", examples=5).include(path="/train", method="POST")


@pytest.fixture(scope="module")
def health_schema(facade: Facade):
    return _schema(facade, "all", examples=5).include(path_regex="^/(healthz|readyz|metrics)$")


classify = schemathesis.pytest.from_fixture("classify_schema")
generate = schemathesis.pytest.from_fixture("generate_schema")
train_read = schemathesis.pytest.from_fixture("train_read_schema")
train_post = schemathesis.pytest.from_fixture("train_post_schema")
health = schemathesis.pytest.from_fixture("health_schema")


@classify.parametrize()
def test_fuzz_classify(case) -> None:
    case.call_and_validate(checks=CHECKS)


@generate.parametrize()
def test_fuzz_generate_negative(case) -> None:
    response = case.call_and_validate(checks=CHECKS)
    assert response.status_code in (401, 404, 405, 413, 415, 422), response.text


@train_read.parametrize()
def test_fuzz_train_with_key(case) -> None:
    case.call_and_validate(headers=AUTH, checks=CHECKS)


@train_post.parametrize()
def test_fuzz_train_post_without_key(case) -> None:
    response = case.call_and_validate(checks=CHECKS)
    assert response.status_code == 401, response.text


@health.parametrize()
def test_fuzz_health(case) -> None:
    if case.path == "/readyz":
        # The deliberate 503: "not ready" is an answer, not a failure of the facade.
        response = case.call()
        assert response.status_code in (200, 503) and "ready" in response.json()
        return
    case.call_and_validate(checks=CHECKS)
