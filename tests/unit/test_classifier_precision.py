"""The int8-or-fp32 decision for the CPU classifier."""

from __future__ import annotations

from export.classifier_precision import choose


def test_int8_within_half_a_point_is_served() -> None:
    served, reason = choose("auto", 0.990, 0.986)
    assert served == "int8" and "within" in reason


def test_int8_more_than_half_a_point_worse_falls_back_with_reason() -> None:
    served, reason = choose("auto", 0.990, 0.980)
    assert served == "fp32" and "1.00 points below" in reason


def test_settings_force_either_and_unmeasured_stays_fp32() -> None:
    assert choose("fp32", 0.9, 0.95)[0] == "fp32"
    assert choose("int8", 0.99, 0.5)[0] == "int8"
    assert choose("auto", None, None) == ("fp32", "no test split next to the model to measure int8 against")
