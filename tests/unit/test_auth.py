"""Operator keys: parsing, constant-time matching, the key file `make up` creates."""

from __future__ import annotations

import os
import re
import stat

import pytest

from api.keys import KeyConfigError, KeyRing, default_key_name, ensure_key_file, load_keyring, parse_keys

KEY_A = "k3Yq9-aZ0pLm7wXr2T"
KEY_B = "b-7Hs2kQ9xLp0Zr4Vw8nM1cT6yJ3fD5gE"


def test_parse_named_and_unnamed_keys() -> None:
    keys = parse_keys(f" ops:{KEY_A} , {KEY_B},")
    assert keys == [("ops", KEY_A), (default_key_name(KEY_B), KEY_B)]
    assert default_key_name(KEY_B).startswith("key-") and KEY_B not in default_key_name(KEY_B)


@pytest.mark.parametrize(
    "spec",
    [
        "short",
        f"bad name:{KEY_A}",
        f"a:{KEY_A},a:{KEY_B}",
        "ops:with space in the key",
        "a" * 24,  # long enough, but typed, not drawn
        f"ops:{KEY_A}:{KEY_B}",  # a second ':' used to end up inside the key, silently
        f"{KEY_A}:{KEY_B}:x",
        f"ops:{KEY_A};{KEY_B}",  # not a bearer token: no client could send it as one
        f'ops:"{KEY_A}"',
    ],
)
def test_unusable_keys_refused_without_quoting_them(spec: str) -> None:
    with pytest.raises(KeyConfigError) as err:
        parse_keys(spec)
    assert err.value.args[0].startswith("FLUXSERVE_API_KEYS")
    assert KEY_A not in str(err.value) and KEY_B not in str(err.value) and "with space" not in str(err.value)


@pytest.mark.parametrize("spec", ["operator:change-me-change-me", "ops:my-secret-api-key-2024", "ci:PASSWORD_PASSWORD"])
def test_placeholder_keys_refused_naming_the_variable(spec: str) -> None:
    with pytest.raises(KeyConfigError, match=r"^FLUXSERVE_API_KEYS: key #1 \(\w+\) is unusable: it is a placeholder"):
        parse_keys(spec)


def test_one_reading_per_item() -> None:
    # A ':' always separates the name; the key itself never has one, so nothing is split silently.
    assert parse_keys(f"{KEY_A}") == [(default_key_name(KEY_A), KEY_A)]
    assert parse_keys(f"ci:{KEY_A}") == [("ci", KEY_A)]
    assert parse_keys(f" ci : {KEY_A} ") == [("ci", KEY_A)]
    base64_key = "QmFzZTY0K2tleS93aXRoL3BhZA=="
    assert parse_keys(f"b64:{base64_key}") == [("b64", base64_key)]


def test_match_returns_the_key_name() -> None:
    ring = KeyRing(parse_keys(f"old:{KEY_A},new:{KEY_B}"))
    assert ring.match(KEY_A) == "old" and ring.match(KEY_B) == "new"
    assert ring.match(KEY_A[:-1]) is None and ring.match("") is None and ring.match(KEY_A + "a") is None
    assert KeyRing([]).match(KEY_A) is None and not KeyRing([]).configured


def test_setting_wins_over_the_file(tmp_path) -> None:
    path = tmp_path / "api_key"
    path.write_text(KEY_B + "\n")
    path.chmod(0o600)
    assert load_keyring(f"env:{KEY_A}", path).names == ["env"]
    assert load_keyring(None, path).match(KEY_B)
    assert not load_keyring(None, tmp_path / "missing").configured


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_key_file_others_may_read_is_refused_with_the_chmod_to_run(tmp_path, mode: int) -> None:
    path = tmp_path / "api_key"
    path.write_text(KEY_B + "\n")
    os.chmod(path, mode)
    with pytest.raises(KeyConfigError) as err:
        load_keyring(None, path)
    assert f"chmod 600 {path}" in str(err.value) and KEY_B not in str(err.value)


def test_placeholder_in_the_key_file_is_refused_naming_the_file(tmp_path) -> None:
    path = tmp_path / "api_key"
    path.write_text("operator:change-me-change-me\n")
    path.chmod(0o600)
    with pytest.raises(KeyConfigError, match="^" + re.escape(f"{path}: key #1")):
        load_keyring(None, path)


def test_key_file_created_once_private(tmp_path) -> None:
    path = tmp_path / ".fluxserve" / "api_key"
    assert ensure_key_file(path) is True
    key = path.read_text().strip()
    assert len(key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ensure_key_file(path) is False and path.read_text().strip() == key  # never overwritten
    assert load_keyring(None, path).match(key)


def test_make_up_creates_the_key_once_and_logs_only_its_path(tmp_path, caplog) -> None:
    import logging

    from api.settings import ApiSettings
    from runtime.stack import announce_operator_key

    settings = ApiSettings(key_file=tmp_path / ".fluxserve" / "api_key")
    with caplog.at_level(logging.INFO, logger="fluxserve.stack"):
        announce_operator_key(settings)
        key = settings.key_file.read_text().strip()
        announce_operator_key(settings)
    assert settings.key_file.read_text().strip() == key
    assert str(settings.key_file) in caplog.text and key not in caplog.text
    assert "created in" in caplog.messages[0] and "created" not in caplog.messages[1]
