"""The adapter store (common/adapter_store.py): names, whole-or-nothing writes, list, read, delete."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pydantic
import pytest

from common.adapter_store import (
    BANK_TENSORS_FILE,
    LORA_FILE,
    RECORD_FILE,
    AdapterExists,
    AdapterNotFound,
    AdapterRecord,
    AdapterStoreError,
    InvalidAdapterName,
    adapters_dir,
    check_name,
    delete_adapter,
    list_adapters,
    read_adapter_record,
    read_factors,
    utc_now_iso,
    write_adapter,
)


def _record(name: str, **kw: object) -> AdapterRecord:
    values = dict(
        name=name,
        trigger_words="zxq dog",
        rank=2,
        scale=0.8,
        owner="alice",
        base_fingerprint="f" * 16,
        sha256="0" * 64,
        created=utc_now_iso(),
        layers=1,
        tensor_bytes=64,
    )
    return AdapterRecord(**(values | kw))


def _factors(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "blocks.0.attn.to_q": (
            rng.standard_normal((4, 2)).astype(np.float32),
            rng.standard_normal((2, 6)).astype(np.float32),
        ),
        "blocks.1.proj": (
            rng.standard_normal((6, 2)).astype(np.float32),
            rng.standard_normal((2, 4)).astype(np.float32),
        ),
    }


@pytest.fixture()
def lora_file(tmp_path: Path) -> Path:
    path = tmp_path / "my.safetensors"
    path.write_bytes(b"not really a LoRA, the store copies bytes")
    return path


def test_the_store_lies_beside_the_repository(tmp_path: Path) -> None:
    assert adapters_dir(tmp_path / "model_repository") == tmp_path / "adapters"


@pytest.mark.parametrize("name", ["my-dog", "a", "0" * 64, "job_1", "5f3a9c" * 5 + "ab"])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "-x", "_x", "My-Dog", "a b", "../x", "x/y", ".hidden", "a" * 65, "dog!", "é", "x\n", None, 3]
)
def test_bad_names_are_refused_with_a_reason(name: object) -> None:
    with pytest.raises(InvalidAdapterName):
        check_name(name)
    if isinstance(name, str):
        with pytest.raises(pydantic.ValidationError, match="name"):
            _record(name)


def test_record_bounds() -> None:
    for bad in ({"scale": 2.5}, {"scale": -0.1}, {"scale": float("nan")}, {"rank": 0}, {"unknown": 1}):
        with pytest.raises(pydantic.ValidationError):
            _record("ok", **bad)


def test_write_read_list_delete(tmp_path: Path, lora_file: Path) -> None:
    root = tmp_path / "adapters"
    assert list_adapters(root) == []
    folder = write_adapter(root, _record("b-second", created="2030-01-02T00:00:00+00:00"), _factors(1), lora_file)
    write_adapter(root, _record("a-first", created="2030-01-01T00:00:00+00:00"), _factors(2), lora_file)
    assert sorted(p.name for p in folder.iterdir()) == sorted([RECORD_FILE, BANK_TENSORS_FILE, LORA_FILE])
    assert (folder / LORA_FILE).read_bytes() == lora_file.read_bytes()
    assert [r.name for r in list_adapters(root)] == ["a-first", "b-second"]  # oldest first
    got = read_adapter_record(root, "b-second")
    assert got == _record("b-second", created="2030-01-02T00:00:00+00:00")
    factors = read_factors(root, "b-second")
    for path, (a, b) in _factors(1).items():
        np.testing.assert_array_equal(factors[path][0], a)
        np.testing.assert_array_equal(factors[path][1], b)
    assert delete_adapter(root, "b-second").name == "b-second"
    assert [r.name for r in list_adapters(root)] == ["a-first"]
    with pytest.raises(AdapterNotFound, match="b-second"):
        read_adapter_record(root, "b-second")
    with pytest.raises(AdapterNotFound, match="b-second"):
        delete_adapter(root, "b-second")
    with pytest.raises(AdapterNotFound):
        read_factors(root, "b-second")
    assert [p.name for p in root.iterdir()] == ["a-first"]  # nothing staged or half-deleted is left


def test_an_adapter_without_a_readable_record_is_deleted_and_its_name_free(tmp_path: Path, lora_file: Path) -> None:
    root = tmp_path / "adapters"
    for name, damage in (("garbled", "{not json"), ("recordless", None)):
        folder = write_adapter(root, _record(name), _factors(1), lora_file)
        if damage is None:
            (folder / RECORD_FILE).unlink()
        else:
            (folder / RECORD_FILE).write_text(damage)
        with pytest.raises(AdapterStoreError):
            read_adapter_record(root, name)
        assert delete_adapter(root, name) is None
        assert not folder.exists()
        write_adapter(root, _record(name), _factors(2), lora_file)  # the name is free again
        assert read_adapter_record(root, name).name == name
    with pytest.raises(InvalidAdapterName):
        delete_adapter(root, "../outside")


def test_a_taken_name_is_refused_and_the_first_adapter_kept(tmp_path: Path, lora_file: Path) -> None:
    root = tmp_path / "adapters"
    write_adapter(root, _record("dog", owner="alice"), _factors(1), lora_file)
    with pytest.raises(AdapterExists, match="dog"):
        write_adapter(root, _record("dog", owner="mallory"), _factors(2), lora_file)
    assert read_adapter_record(root, "dog").owner == "alice"
    np.testing.assert_array_equal(read_factors(root, "dog")["blocks.1.proj"][0], _factors(1)["blocks.1.proj"][0])


def test_concurrent_writers_of_one_name_one_wins(tmp_path: Path, lora_file: Path) -> None:
    root = tmp_path / "adapters"
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def publish(i: int) -> None:
        barrier.wait()
        try:
            write_adapter(root, _record("race", owner=f"w{i}"), _factors(i), lora_file)
            outcomes.append("ok")
        except AdapterExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["exists"] * 5 + ["ok"]
    owner = read_adapter_record(root, "race").owner
    np.testing.assert_array_equal(
        read_factors(root, "race")["blocks.0.attn.to_q"][0], _factors(int(owner[1:]))["blocks.0.attn.to_q"][0]
    )
    assert [p.name for p in root.iterdir()] == ["race"]


def test_a_failed_write_leaves_nothing(tmp_path: Path, lora_file: Path) -> None:
    root = tmp_path / "adapters"
    bad = {"x": (np.zeros((4, 2), np.float32), np.zeros((3, 4), np.float32))}  # rank 2 vs 3
    with pytest.raises(AdapterStoreError, match="x"):
        write_adapter(root, _record("half"), bad, lora_file)
    with pytest.raises(FileNotFoundError):
        write_adapter(root, _record("half"), _factors(), tmp_path / "missing.safetensors")
    assert list(root.iterdir()) == []
    assert list_adapters(root) == []


def test_names_cannot_escape_the_store(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / RECORD_FILE).write_text(_record("secret").model_dump_json())
    for name in ("../secret", "..", "secret/.."):
        with pytest.raises(InvalidAdapterName):
            read_adapter_record(root, name)
        with pytest.raises(InvalidAdapterName):
            delete_adapter(root, name)
    assert (tmp_path / "secret" / RECORD_FILE).exists()


def test_unreadable_records_are_skipped_in_the_list(tmp_path: Path, lora_file: Path) -> None:
    root = tmp_path / "adapters"
    write_adapter(root, _record("good"), _factors(), lora_file)
    (root / "broken").mkdir()
    (root / "broken" / RECORD_FILE).write_text("{not json")
    (root / "Not-A-Slug").mkdir()
    (root / ".staging-x-1234").mkdir()
    assert [r.name for r in list_adapters(root)] == ["good"]
    with pytest.raises(AdapterStoreError, match="broken"):
        read_adapter_record(root, "broken")
