"""Secrets that cannot be placeholders (common/secret_strength.py): the one check behind every secret."""

from __future__ import annotations

import os
import secrets

import pytest

from common.secret_strength import SecretConfigError, read_private_file, require_strong_secret, secret_problem

ISSUE_26_EXAMPLES = ["change-me", "change-me-too", "change-me-change-me", "CHANGE_ME_NOW_0123456789"]
"""The example file's old values (and the like): each worked as a real secret before."""


@pytest.mark.parametrize(
    "value",
    [
        *ISSUE_26_EXAMPLES,
        "my-secret-queue-key-2024",
        "Password1234567890",
        "replace_me_with_something_long",
        "<placeholder-value-here>",
        "an-example-operator-key",
    ],
)
def test_placeholders_are_refused_whatever_their_length(value: str) -> None:
    assert "placeholder" in secret_problem(value)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("0123456789abcde", "too short"),  # 15
        ("a" * 40, "too repetitive"),
        ("abab" * 10, "too repetitive"),
        ("1234" * 8, "too repetitive"),
    ],
)
def test_short_or_typed_values_are_refused(value: str, why: str) -> None:
    assert why in secret_problem(value)


@pytest.mark.parametrize(
    "value",
    [secrets.token_hex(24), secrets.token_urlsafe(32), "k3Yq9-aZ0pLm7wXr"],
    ids=["hex", "urlsafe", "typed-by-hand"],
)
def test_random_values_pass(value: str) -> None:
    assert secret_problem(value) is None


def test_refusal_names_the_variable_and_how_to_fix_it_never_the_value() -> None:
    with pytest.raises(SecretConfigError) as err:
        require_strong_secret("FLUXSERVE_JOBS_QUEUE_SECRET", "change-me-too")
    message = str(err.value)
    assert message.startswith("FLUXSERVE_JOBS_QUEUE_SECRET is unusable") and "openssl rand" in message
    assert "change-me-too" not in message
    require_strong_secret("FLUXSERVE_JOBS_QUEUE_SECRET", secrets.token_hex(24))  # no error


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602])
def test_a_secret_file_others_may_open_is_refused(tmp_path, mode: int) -> None:
    path = tmp_path / "api_key"
    path.write_text("x\n")
    os.chmod(path, mode)
    with pytest.raises(SecretConfigError) as err:
        read_private_file(path)
    assert str(path) in str(err.value) and f"chmod 600 {path}" in str(err.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_secret_file_is_read(tmp_path, mode: int) -> None:
    path = tmp_path / "api_key"
    path.write_text("the text\n")
    os.chmod(path, mode)
    assert read_private_file(path) == "the text\n"
