"""The Triton control key: where it comes from, what is refused, and the flags Triton gets."""

from __future__ import annotations

import stat

import pytest

from client.control_key import (
    CONTROL_KEY_HEADER,
    GRPC_CONTROL_KEY_HEADER,
    RESTRICTED_APIS,
    ControlKeyError,
    ControlKeySettings,
    control_headers,
    control_key,
    ensure_control_key,
    main,
    restricted_api_flags,
)
from runtime.launcher import TritonSettings, build_command

GOOD = "k" * 12 + "0123456789_-"


def settings(tmp_path, key: str | None = None) -> ControlKeySettings:
    return ControlKeySettings(control_key=key, control_key_file=tmp_path / ".fluxserve" / "triton_control_key")


def test_key_file_created_once_private(tmp_path) -> None:
    s = settings(tmp_path)
    assert control_key(s) is None and control_headers(s) == {}
    key = ensure_control_key(s)
    assert stat.S_IMODE(s.control_key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(s.control_key_file.parent.stat().st_mode) == 0o700
    assert ensure_control_key(s) == key == control_key(s)  # never overwritten
    assert control_headers(s) == {CONTROL_KEY_HEADER: key}
    assert control_headers(s, grpc=True) == {GRPC_CONTROL_KEY_HEADER: key}


def test_setting_wins_over_file(tmp_path) -> None:
    ensure_control_key(settings(tmp_path))
    assert control_key(settings(tmp_path, GOOD)) == GOOD


@pytest.mark.parametrize("bad", ["change-me", "x" * 23, "a" * 30 + ":b", "a" * 30 + "=b", "a" * 30 + " b", "a,b" * 10])
def test_weak_or_misparsable_keys_refused(tmp_path, bad) -> None:
    with pytest.raises(ControlKeyError, match="FLUXSERVE_TRITON_CONTROL_KEY") as e:
        control_key(settings(tmp_path, bad))
    assert bad not in str(e.value)


def test_group_readable_key_file_refused(tmp_path) -> None:
    s = settings(tmp_path)
    ensure_control_key(s)
    s.control_key_file.chmod(0o644)
    with pytest.raises(ControlKeyError, match="chmod 600"):
        control_key(s)


def test_flags_restrict_control_not_inference() -> None:
    flags = restricted_api_flags(GOOD)
    assert [f.split("=", 1)[0] for f in flags] == ["--http-restricted-api", "--grpc-restricted-protocol"]
    for flag in flags:
        apis, header = flag.split("=", 1)[1].split(":")
        assert set(apis.split(",")) == set(RESTRICTED_APIS) >= {"model-repository", "model-config"}
        assert not set(apis.split(",")) & {"inference", "health", "metadata"}
        assert header == f"{CONTROL_KEY_HEADER}={GOOD}"


def test_launcher_always_restricts(tmp_path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text("")
    cmd = build_command(TritonSettings(model_repository=tmp_path), tmp_path, GOOD)
    assert "--model-control-mode=explicit" in cmd
    assert set(restricted_api_flags(GOOD)) <= set(cmd)


def test_image_entrypoint_flags(monkeypatch, capsys) -> None:
    """deploy/docker/Dockerfile.gpu splices this output into tritonserver's command line."""
    monkeypatch.setenv("FLUXSERVE_TRITON_CONTROL_KEY", "short")
    assert main() == 1 and capsys.readouterr().out == ""
    monkeypatch.setenv("FLUXSERVE_TRITON_CONTROL_KEY", GOOD)
    assert main() == 0 and capsys.readouterr().out.split() == restricted_api_flags(GOOD)


def test_launcher_passes_the_exit_timeout(tmp_path) -> None:
    """Triton's drain on stop is the setting (production keeps Triton's own 30 s)."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text("")
    settings = TritonSettings(model_repository=tmp_path, exit_timeout_s=7)
    assert "--exit-timeout-secs=7" in build_command(settings, tmp_path, GOOD)
    assert TritonSettings.model_fields["exit_timeout_s"].default == 30
