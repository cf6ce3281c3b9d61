"""Every route that runs a model depends on the inference key, attached once (api.routes.inference):
read from the app's own routes, so a new route that reaches a model service without the lock fails
here. (tests/unit/facade/test_inference_lock.py checks what an anonymous caller gets on each.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import iter_route_contexts

from api.auth import require_inference_key
from api.services.classification import classification_service
from api.services.generation import generation_service
from tests.unit.facade.harness import facade_settings

MODEL_SERVICES = {generation_service, classification_service}


def calls(dependant: Dependant) -> Iterator[Callable]:
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield dep.call
        yield from calls(dep)


def test_every_route_that_runs_a_model_needs_the_inference_key(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.app import create_app

    monkeypatch.setenv("FLUXSERVE_JOBS_JOBS_DIR", str(tmp_path / "jobs"))
    app = create_app(facade_settings())
    model_routes, locked = set(), set()
    # The routes as served, each with the dependencies its routers added (FastAPI's route contexts).
    for route in iter_route_contexts(app.routes):
        dependant = getattr(route, "dependant", None)
        if dependant is None:  # not a FastAPI route (docs, static files)
            continue
        used = set(calls(dependant))
        for method in route.methods or ():
            if used & MODEL_SERVICES:
                model_routes.add((method, route.path))
            if require_inference_key in used:
                locked.add((method, route.path))
    assert model_routes == {("POST", "/classify"), ("POST", "/generate"), ("POST", "/chat")}
    assert locked == model_routes
