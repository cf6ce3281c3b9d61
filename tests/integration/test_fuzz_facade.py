"""Schemathesis against the real facade (real Triton behind it): POST /classify with valid bodies,
so every fuzzed text runs through the real tokenizer and classifier, and no answer may be a 5xx
(`not_a_server_error`). Every other route, and /classify's invalid bodies, are fuzzed in-process
against a fake Triton (tests/unit/facade/test_http_fuzz.py). Example counts are small to keep the
suite fast; raise FLUXSERVE_FUZZ_EXAMPLES for a deeper run.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.conftest import Facade

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FLUXSERVE_FUZZ_EXAMPLES", "10"))


@pytest.fixture(scope="module")
def api_schema(facade: Facade):
    return schemathesis.openapi.from_url(f"{facade.url}/openapi.json")


def test_fuzz_classify_through_the_real_classifier(api_schema) -> None:
    operation = api_schema["/classify"]["POST"]
    statuses: list[int] = []

    # No shrinking: a failure is reported as generated.
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    def run(case) -> None:
        statuses.append(case.call_and_validate(checks=[not_a_server_error]).status_code)

    run()
    assert any(s == 200 for s in statuses), statuses  # the texts reached the classifier
