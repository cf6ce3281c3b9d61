"""Job records as callers see them (no host paths), the classifier accuracy gate, and the zip
end-record check that refuses a huge directory before parsing it."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import pytest

from api.job_view import public_job
from publish.classifier import serving_classifier_accuracy
from training.jobs import Job
from training.lora_dataset import DatasetError, DatasetLimits, validate_and_extract
from training.tasks import PublishError, _accuracy_gate


def test_public_job_has_no_host_paths(tmp_path: Path) -> None:
    folder = tmp_path / "jobs" / "abc"
    job = Job(
        id="abc",
        kind="flux_lora",
        status="failed",
        created_unix=0,
        updated_unix=0,
        params={"trigger_word": "/not/a/path/but/input"},
        result={
            "lora_dir": f"{folder}/lora",
            "manifest": {"base_checkpoint": "/srv/models/flux-dev", "url": "http://127.0.0.1:8000/v2"},
        },
        error=f"OSError: [Errno 2] No such file: '/srv/secret/place/file.onnx' in {folder}/onnx",
    )
    view = public_job(job, folder)
    assert view["result"]["lora_dir"] == "lora"
    assert view["result"]["manifest"]["base_checkpoint"] == "…/flux-dev"
    assert view["result"]["manifest"]["url"] == "http://127.0.0.1:8000/v2"
    assert "/srv" not in view["error"] and str(tmp_path) not in json.dumps(view) and "file.onnx" in view["error"]
    assert view["params"]["trigger_word"] == "/not/a/path/but/input"  # the caller's own input


def test_accuracy_gate() -> None:
    result: dict = {}
    _accuracy_gate(result, 0.95, 0.95)  # equal is enough
    assert result["accuracy_gate"] == {"test_accuracy": 0.95, "serving_test_accuracy": 0.95}
    _accuracy_gate(result, 0.9, None)  # nothing known to compare with
    with pytest.raises(PublishError) as err:
        _accuracy_gate(result := {}, 0.80, 0.97)
    assert "0.8000" in str(err.value) and "0.9700" in str(err.value)
    assert err.value.result["publish"] == {"status": "refused"}


def test_serving_accuracy_from_manifest_or_model_metrics(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert serving_classifier_accuracy(repo) is None
    model = tmp_path / "model"
    model.mkdir()
    (model / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.91}}))
    (repo / "classify" / "1").mkdir(parents=True)
    (repo / "classify" / "1" / "fluxserve_manifest.json").write_text(
        json.dumps({"provenance": {"classifier": str(model)}, "report": {}})
    )
    assert serving_classifier_accuracy(repo) == 0.91
    (repo / "classify" / "2").mkdir()
    (repo / "classify" / "2" / "fluxserve_manifest.json").write_text(
        json.dumps({"provenance": {}, "report": {"test_accuracy": 0.97}})
    )
    assert serving_classifier_accuracy(repo) == 0.97


def _eocd(entries: int, dir_bytes: int, dir_offset: int = 0) -> bytes:
    return struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, min(entries, 0xFFFF), min(entries, 0xFFFF), dir_bytes, dir_offset, 0
    )


@pytest.mark.parametrize(
    ("tail", "status"),
    [
        (_eocd(60000, 3_000_000), 422),  # too many entries declared
        (_eocd(100, 50 * 1024 * 1024), 413),  # a 50 MB directory
        (b"PK\x03\x04" + b"\0" * 100, 415),  # no end record at all
    ],
    ids=["entries", "directory-size", "no-end-record"],
)
def test_end_record_refused_before_parsing(tmp_path: Path, tail: bytes, status: int) -> None:
    # The body is junk: only the end record is read, so the refusal does not depend on it.
    path = tmp_path / "d.zip"
    path.write_bytes(b"\0" * 1000 + tail)
    with pytest.raises(DatasetError) as err:
        validate_and_extract(path, tmp_path / "out", "zxq")
    assert err.value.http_status == status
    assert not (tmp_path / "out").exists()


def test_zip64_end_record_is_read(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(3000):
            zf.writestr(f"{i}.txt", b"")
    data = buf.getvalue()
    # Rewrite as a zip64 end record + locator + a classic record saying "see zip64".
    classic_at = data.rfind(b"PK\x05\x06")
    _, _, _, _, n, size, offset, _ = struct.unpack_from("<4sHHHHIIH", data, classic_at)
    z64 = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, size, offset)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, classic_at, 1)
    classic = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path = tmp_path / "d.zip"
    path.write_bytes(data[:classic_at] + z64 + locator + classic)
    with pytest.raises(DatasetError, match="3000 entries"):
        validate_and_extract(path, tmp_path / "out", "zxq", DatasetLimits())
