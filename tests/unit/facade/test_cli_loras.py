"""`fluxserve-client loras list|show|delete` and `train submit --adapter --name` (issue 27) against
the facade in-process: FacadeClient's HTTP client is swapped for Starlette's TestClient (an httpx
client that calls the app directly), so the CLI's requests go through the real routes."""

from __future__ import annotations

import argparse
import json
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

import client.cli
from api.app import create_app
from client.facade_client import FacadeClient
from common.adapter_store import adapters_dir
from tests.unit.facade.fake_triton import FakeTriton, fake_factory
from tests.unit.facade.harness import BASE_URL, KEY, facade_settings
from tests.unit.facade.test_http_loras import write_test_adapter
from tests.unit.facade.test_http_train import png
from tests.unit.facade.test_http_train_adapter import serve_bank
from training.jobs import ADAPTER_NAME_PARAM

WRONG_KEY = "k" * 40


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    app = create_app(facade_settings(), triton=fake_factory(FakeTriton()))

    def facade_client(base_url: str = BASE_URL, api_key: str | None = None, timeout_s: float = 60.0) -> FacadeClient:
        api = FacadeClient(BASE_URL, api_key=api_key)
        api._http = TestClient(app, base_url=BASE_URL, headers=dict(api._http.headers))
        return api

    monkeypatch.setattr(client.cli, "FacadeClient", facade_client)
    return app


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object]:
    code = client.cli.main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def test_loras_list_show_delete(app: FastAPI, capsys: pytest.CaptureFixture[str], caplog) -> None:
    root = adapters_dir(app.state.fluxserve.job_settings.model_repository)
    sha = write_test_adapter(root, "my-dog", trigger_words="sks dog")
    assert run(capsys, "loras", "--api-key", KEY, "list")[1][0]["name"] == "my-dog"
    code, shown = run(capsys, "loras", "--api-key", KEY, "show", "my-dog")
    assert code == 0 and (shown["sha256"], shown["trigger_words"]) == (sha, "sks dog")
    assert run(capsys, "loras", "--api-key", WRONG_KEY, "delete", "my-dog") == (2, None)
    assert "401" in caplog.text and (root / "my-dog").is_dir()
    assert run(capsys, "loras", "--api-key", KEY, "delete", "my-dog")[0] == 0
    assert run(capsys, "loras", "--api-key", KEY, "show", "my-dog") == (2, None)
    assert "no adapter named 'my-dog'" in caplog.text
    assert run(capsys, "loras", "--api-key", KEY, "list") == (0, [])


def test_train_submit_as_an_adapter(app: FastAPI, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    state = app.state.fluxserve
    serve_bank(state.job_settings.model_repository)
    state.jobs.heartbeat("test-worker")
    data = BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        zf.writestr("a.png", png())
    upload = tmp_path / "images.zip"
    upload.write_bytes(data.getvalue())
    args = ("train", "--api-key", KEY, "submit", str(upload), "--trigger-word", "zxq", "--adapter", "--name", "my-dog")
    code, accepted = run(capsys, *args)
    assert code == 0 and accepted["status"] == "queued", accepted
    params = state.jobs.get(accepted["job_id"]).params
    assert params["publish"] == "adapter" and params[ADAPTER_NAME_PARAM] == "my-dog"
    with pytest.raises(SystemExit):  # one choice of how to publish
        client.cli.main([*args, "--no-publish"])


def test_generate_takes_the_adapter_options(caplog) -> None:
    # Refused by the contract before any connection (nothing listens on port 1).
    assert client.cli.main(["--url", "127.0.0.1:1", "generate", "x", "--lora", "My Dog", "--no-progress"]) == 2
    assert "lora: adapter name 'My Dog' is not a slug" in caplog.text
    assert client.cli.main(["--url", "127.0.0.1:1", "generate", "x", "--lora", "a", "--lora-scale", "9"]) == 2
    assert "lora_scale" in caplog.text
    args = argparse.Namespace(
        prompt="x", seed=1, width=64, height=64, steps=2, guidance=3.5, lora="my-dog", lora_scale=0.5
    )
    params = client.cli.cli_params(args)
    assert (params.lora, params.lora_scale) == ("my-dog", 0.5)
    with pytest.raises(ValueError, match="lora_scale"):
        client.cli.cli_params(argparse.Namespace(**{**vars(args), "lora_scale": 3.0}))
