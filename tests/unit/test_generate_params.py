"""GenerateParams is the one parameter object of a generation: the `generate` model's inputs by
name, checked once by the contract, carried whole from the HTTP body to the model's loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from api.schemas import GenerateOptions, GenerateRequest
from contract.codec import generate_inputs, params_arrays, read_params
from contract.errors import InvalidInputError
from contract.specs import FLUX_PREPARE, GENERATE, GENERATE_LIMITS, GENERATE_STREAM, GenerateParams, ImageOptions


def test_its_fields_are_the_generate_models_inputs() -> None:
    assert set(GenerateParams.model_fields) == {t.name for t in GENERATE.inputs}
    assert GENERATE_STREAM.inputs == GENERATE.inputs
    # Everything but the prompt is optional on the wire, and has a default here.
    optional = {t.name for t in GENERATE.inputs if t.optional}
    assert optional == set(ImageOptions.model_fields)


def test_the_wire_round_trip_is_the_identity() -> None:
    params = GenerateParams(prompt="a lighthouse, é", seed=2**40, steps=3, guidance=1.25, width=96, height=64)
    arrays = params_arrays(params)
    assert {name: a.dtype for name, a in arrays.items()}["seed"] == np.int64
    assert read_params(arrays.get) == params


def test_an_absent_optional_input_takes_its_default() -> None:
    params = GenerateParams(prompt="x")  # no seed: "any"
    assert "seed" not in params_arrays(params)
    assert read_params(params_arrays(params).get) == GenerateParams(prompt="x", seed=0)


def test_flux_prepare_reads_its_share_of_the_same_object() -> None:
    params = GenerateParams(prompt="x", seed=5, steps=2, width=64, height=64)
    arrays = params_arrays(params, FLUX_PREPARE)
    assert set(arrays) == {"prompt", "width", "height", "steps", "seed"}  # guidance is not its input
    arrays["clip_version"] = np.array([1], np.int64)
    assert read_params(arrays.get, FLUX_PREPARE).model_dump(exclude={"guidance"}) == params.model_dump(
        exclude={"guidance"}
    )


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"width": 100}, "width"),
        ({"height": GENERATE_LIMITS.max_side + 16}, "height"),
        ({"steps": 0}, "steps"),
        ({"guidance": math.nan}, "guidance"),
        ({"seed": -1}, "seed"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * (GENERATE_LIMITS.max_prompt_chars + 1)}, "prompt"),
        ({"negative_prompt": "no"}, "negative_prompt"),
    ],
)
def test_bad_values_are_refused_naming_the_field(bad: dict, named: str) -> None:
    with pytest.raises(InvalidInputError, match=f"^{named}: "):
        GenerateParams.build(**{"prompt": "a fox", **bad})


def test_nothing_unchecked_reaches_the_wire() -> None:
    unchecked = GenerateParams.model_construct(prompt="a fox", seed=1, steps=1, guidance=1.0, width=100, height=64)
    with pytest.raises(InvalidInputError, match="width"):
        generate_inputs(unchecked)


def test_seeded_keeps_a_seed_and_draws_one_when_absent() -> None:
    assert GenerateParams(prompt="x", seed=9).seeded().seed == 9
    assert GenerateParams(prompt="x").seeded().seed is not None


def test_the_http_body_is_the_same_object_plus_how_many_and_which_format() -> None:
    # A new ImageOptions field appears in /generate's body and /chat's options with no edit in api/.
    assert set(ImageOptions.model_fields) <= set(GenerateOptions.model_fields)
    assert set(GenerateParams.model_fields) <= set(GenerateRequest.model_fields)
    body = GenerateRequest(prompt="a fox", width=64, height=64, steps=2, num_images=3, seed=10)
    images = body.image_params("Super Realism, a fox", 10)
    assert [p.seed for p in images] == [10, 11, 12]
    assert {p.prompt for p in images} == {"Super Realism, a fox"}
    assert images[0].model_dump(exclude={"seed", "prompt"}) == body.model_dump(
        include=set(ImageOptions.model_fields) - {"seed"}
    )


def test_a_prompt_grown_past_the_limit_by_trigger_words_is_refused() -> None:
    body = GenerateRequest(prompt="x" * GENERATE_LIMITS.max_prompt_chars)
    with pytest.raises(InvalidInputError, match="^prompt: "):
        body.image_params("Super Realism, " + body.prompt, 1)
