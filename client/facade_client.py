"""`FacadeClient`: the HTTP facade's training and adapter API (and /classify) from Python, with the operator key.

    with FacadeClient("http://127.0.0.1:8080", api_key=...) as api:   # or FLUXSERVE_API_KEY
        job = api.submit_lora("my_images.zip", trigger_word="zxq", steps=40)
        api.job(job["job_id"])

Errors come back as contract.errors.ApiError (AuthenticationError for a 401), carrying the facade's
stable error type and message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx

from contract.errors import ApiError, AuthenticationError
from contract.specs import ENDPOINTS

DEFAULT_API_URL = f"http://{ENDPOINTS.host}:{ENDPOINTS.api_port}"
API_KEY_ENV = "FLUXSERVE_API_KEY"
KEY_FILE = Path(".fluxserve") / "api_key"
"""Where `make up` puts the operator key it creates, relative to the project folder."""


def read_key_file(path: Path = KEY_FILE) -> str | None:
    """The key in `path` (the first one when it lists several), or None when there is none."""
    try:
        first = path.read_text().strip().split(",")[0].strip()
    except OSError:
        return None
    _, sep, key = first.partition(":")  # `name:key` or a bare key
    return (key if sep else first) or None


def _publish_field(publish: bool | str) -> str:
    """POST /train's `publish` form field: "true", "false" or "adapter"."""
    return publish if isinstance(publish, str) else str(publish).lower()


class FacadeClient:
    """Blocking client of the facade. `api_key` defaults to $FLUXSERVE_API_KEY (read when created)."""

    def __init__(self, base_url: str = DEFAULT_API_URL, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FacadeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self._http.request(method, path, **kwargs)
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                kind, message = str(err["type"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                kind, message = "http_error", r.text[:200]
            cls = AuthenticationError if r.status_code == 401 else ApiError
            raise cls(r.status_code, kind, message)
        return r.json()

    def submit_lora(
        self,
        dataset: str | Path,
        trigger_word: str,
        publish: bool | Literal["adapter"] = True,
        name: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """POST /train with a zip of images; `params`: steps, rank, learning_rate, resolution, seed, batch_size.
        `publish="adapter"` publishes the LoRA as the adapter `name` (default: the job id) instead
        of a new model version."""
        fields = {
            "trigger_word": trigger_word,
            "publish": _publish_field(publish),
            **({"name": name} if name is not None else {}),
            **{k: str(v) for k, v in params.items() if v is not None},
        }
        with Path(dataset).open("rb") as fh:
            return self._call(
                "POST", "/train", data=fields, files={"dataset": (Path(dataset).name, fh, "application/zip")}
            )

    def submit_classifier(
        self, epochs: int | None = None, publish: bool | Literal["adapter"] = True, **params: Any
    ) -> dict[str, Any]:
        """POST /train kind=classifier; `params`: learning_rate, seed, batch_size."""
        fields = {"kind": "classifier", "publish": _publish_field(publish), "steps": epochs, **params}
        return self._call("POST", "/train", data={k: str(v) for k, v in fields.items() if v is not None})

    def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._call("GET", "/train", params={"limit": limit})["jobs"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/train/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/train/{job_id}")

    def loras(self) -> list[dict[str, Any]]:
        """GET /loras: the published adapters."""
        return self._call("GET", "/loras")["loras"]

    def lora(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/loras/{quote(name, safe='')}")

    def delete_lora(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/loras/{quote(name, safe='')}")

    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        return self._call("POST", "/classify", json={"texts": texts})["results"]
