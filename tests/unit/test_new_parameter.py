"""A new generation parameter is an edit of contract/specs.py alone, as far as the wire and the
facade go (issue 25: "a new /generate parameter touches at most 4 source files": contract/specs.py
for the field and its tensor, serving/flux_loop.py to use it, the docs page, and the playground
page if it should show it).

The test makes that edit for real, in a copy of the `contract` package (a `sharpness` field on
ImageOptions and its optional FP32 input on GENERATE, nothing else), and runs the project's own
api/, client code and codec against it in a fresh interpreter: the parameter reaches the HTTP
bodies of /generate and /chat with its bounds, the OpenAPI page, the Triton configs of `generate`
and `generate_stream`, the gRPC inputs, a model's request reader, and the facade hands it to
Triton whole."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from common.paths import PROJECT_ROOT

FIELD = "    height: Side = GENERATE_DEFAULTS.height\n"
TENSOR = '        TensorSpec("height", "TYPE_INT32", (1,), optional=True),\n'
NEW_FIELD = "    sharpness: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0\n"
NEW_TENSOR = '        TensorSpec("sharpness", "TYPE_FP32", (1,), optional=True),\n'

CHECK = textwrap.dedent(
    """
    import asyncio

    import numpy as np
    import pydantic

    import contract
    from api.schemas import ChatRequest, GenerateRequest
    from contract.codec import generate_inputs, params_arrays, read_params
    from contract.specs import GENERATE, GENERATE_STREAM
    from export.deployments import flux_deployments
    from export.triton_config import config_text
    from tests.unit.facade.harness import running_facade

    assert contract.__file__.startswith(COPY), contract.__file__  # the edited contract, not the project's

    body = GenerateRequest(prompt="a fox", sharpness=1.5, seed=3, num_images=2, width=64, height=64, steps=2)
    images = body.image_params("a fox", 3)
    assert [p.sharpness for p in images] == [1.5, 1.5] and [p.seed for p in images] == [3, 4]
    arrays = params_arrays(images[0])
    assert arrays["sharpness"].dtype == np.float32
    assert read_params(arrays.get) == images[0]  # what a model's request reader sees
    inputs, _ = generate_inputs(images[0])
    assert {i.name(): i.datatype() for i in inputs}["sharpness"] == "FP32"
    assert GenerateRequest(prompt="a fox").image_params("a fox", 1)[0].sharpness == 1.0  # the default
    for bad in (5.0, -1.0):
        try:
            GenerateRequest(prompt="a fox", sharpness=bad)
        except pydantic.ValidationError as e:
            assert "sharpness" in str(e)
        else:
            raise AssertionError(f"sharpness={bad} accepted")
    assert ChatRequest(message="draw a fox", generate={"sharpness": 0.5}).generate.sharpness == 0.5
    for name in (GENERATE.name, GENERATE_STREAM.name):
        assert 'name: "sharpness"' in config_text(flux_deployments()[name], "cpu"), name

    async def facade() -> None:
        async with running_facade() as f:
            schema = f.app.openapi()["components"]["schemas"]
            assert "sharpness" in schema["GenerateRequest"]["properties"]
            assert "sharpness" in schema["GenerateOptions"]["properties"]
            small = {"width": 64, "height": 64, "steps": 1, "sharpness": 0.25}
            r = await f.http.post("/generate", json={"prompt": "a fox", **small})
            assert r.status_code == 200, r.text
            r = await f.http.post("/generate", json={"prompt": "a fox", **small}, headers={"Accept": "text/event-stream"})
            assert r.status_code == 200 and "event: image" in r.text, r.text
            r = await f.http.post("/chat", json={"message": "draw a fox", "generate": small})
            assert r.status_code == 200 and r.json()["kind"] == "image", r.text
            assert [p.sharpness for p in f.fake.generated] == [0.25, 0.25, 0.25]
            r = await f.http.post("/generate", json={"prompt": "a fox", **small, "sharpness": 3})
            assert r.status_code == 422 and "sharpness" in r.json()["error"]["message"], r.text

    asyncio.run(facade())
    print("ok")
    """
)


def test_a_new_parameter_is_one_edit_of_the_contract(tmp_path: Path) -> None:
    copy = tmp_path / "edited"
    shutil.copytree(PROJECT_ROOT / "contract", copy / "contract", ignore=shutil.ignore_patterns("__pycache__"))
    specs = copy / "contract" / "specs.py"
    text = specs.read_text()
    # The anchors of the edit: if contract/specs.py is reorganised, move them with it.
    assert text.count(FIELD) == 1 and text.count(TENSOR) == 1, "update the anchors of this test"
    specs.write_text(text.replace(FIELD, FIELD + NEW_FIELD).replace(TENSOR, TENSOR + NEW_TENSOR))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(copy), str(PROJECT_ROOT)]),
        "FLUXSERVE_JOBS_JOBS_DIR": str(tmp_path / "jobs"),
    }
    for name in ("FLUXSERVE_API_KEYS", "FLUXSERVE_JOBS_REDIS_URL"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", f"COPY = {str(copy)!r}\n{CHECK}"],
        cwd=tmp_path,  # not the project root: `python -c` puts the working folder first on sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]
