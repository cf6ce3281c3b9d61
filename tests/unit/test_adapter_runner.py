"""The transformer's adapter slots and generate's adapter choice, in-process (serving/adapter_runner.py,
serving/adapter_choice.py): names to slots, LRU that never evicts what a batch uses, rounds when a
batch names more adapters than slots, republish and delete, unknown names failing alone, requests
with different adapters merged into one forward pass. A fake session stands in for ONNX Runtime
(the numerics of the real one are tests/unit/test_adapter_bank.py's)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from common.adapter_bank import SCALE_INPUT, AdapterWeights, BankGroup, BankLayout
from common.adapter_store import (
    AdapterRecord,
    delete_adapter,
    read_adapter_record,
    split_key,
    utc_now_iso,
    write_adapter,
)
from contract.specs import (
    ADAPTER_OUTPUT,
    ADAPTER_SHA256_OUTPUT,
    FLUX_ADAPTER_INPUT,
    FLUX_IO_NAMES,
    FLUX_TRANSFORMER,
    GenerateParams,
)
from serving.adapter_choice import AdapterResolver
from serving.adapter_runner import AdapterRunner, SlotTable, rounds, run_checked
from serving.onnx_runner import BatchedOnnxRunner

BASE = "base-fp"
LAYOUT = BankLayout(4, "grouped", (BankGroup("4x6", ("blocks.0.q", "blocks.1.q"), 4, 6),), BASE)
STEP_INPUTS = list(FLUX_IO_NAMES[FLUX_TRANSFORMER][0])


class FakeSession:
    """AdapterSession's face: `run` answers, per row, the row's slot (+ its scale / 10) in every
    element, and the bank slot's "identity" (the sum of the loaded A) in the last element."""

    def __init__(self, slots: int) -> None:
        self.layout = LAYOUT
        self.bank = SimpleNamespace(slots=slots)
        self.step_inputs = STEP_INPUTS
        self.output_name = "latent"
        self.loaded: dict[int, float] = {}
        self.loads: list[tuple[int, float]] = []
        self.runs: list[tuple[list[int], list[float]]] = []

    def load(self, slot: int, adapter: AdapterWeights) -> None:
        ident = float(sum(a.sum() for a, _ in adapter.factors.values()))
        self.loaded[slot] = ident
        self.loads.append((slot, ident))

    def run(self, inputs: dict, slots: list[int], scales: list[float]) -> np.ndarray:
        assert all(inputs[n].shape[0] == len(slots) for n in self.step_inputs)
        self.runs.append((list(slots), list(scales)))
        out = np.zeros((len(slots), 2, 3), np.float32)
        for i, (slot, scale) in enumerate(zip(slots, scales)):
            out[i] = slot + scale / 10
            out[i, -1, -1] = self.loaded.get(slot, 0.0) if slot else 0.0
        return out


def publish(root: Path, name: str, value: float, base: str = BASE, trigger: str = "", scale: float = 1.0) -> None:
    """An adapter whose A factors are all `value` (its identity in FakeSession's output)."""
    factors = {p: (np.full((4, 2), value, np.float32), np.ones((2, 6), np.float32)) for p in LAYOUT.layers}
    record = AdapterRecord(
        name=name,
        trigger_words=trigger,
        rank=2,
        scale=scale,
        base_fingerprint=base,
        sha256=f"{value:064.0f}"[-64:],
        created=utc_now_iso(),
        layers=2,
        tensor_bytes=224,
    )
    lora = root.parent / f"{name}.safetensors"
    lora.write_bytes(b"lora")
    write_adapter(root, record, factors, lora)


def ident(value: float) -> float:
    return float(value * 4 * 2 * len(LAYOUT.layers))


def step(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"timestep": (rows,), "guidance": (rows,), "pooled_projections": (rows, 3)}
    return {n: rng.standard_normal(shapes.get(n, (rows, 2, 3))).astype(np.float32) for n in STEP_INPUTS}


def request(name: str | None, scale: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """One generate's transformer call as Triton hands it to the model: [1, 1] adapter inputs."""
    return step(1, seed) | {
        FLUX_ADAPTER_INPUT: np.array([[(name or "").encode()]], dtype=np.object_),
        SCALE_INPUT: np.array([[scale if name else 0.0]], np.float32),
    }


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    for i, name in enumerate(("a", "b", "c", "d"), start=1):
        publish(root, name, float(i))
    return root


def runner(store: Path, slots: int) -> tuple[AdapterRunner, FakeSession]:
    session = FakeSession(slots)
    return AdapterRunner(session, store), session


# ----------------------------------------------------------------------------- slot table


def test_slot_table_lru_never_evicts_what_the_round_uses() -> None:
    table = SlotTable(2)
    assert table.assign(["a"]) == ({"a": 1}, {"a": 1})
    assert table.assign(["b", "a"]) == ({"b": 2, "a": 1}, {"b": 2})
    assert table.assign(["a"]) == ({"a": 1}, {})  # loaded: nothing to do
    assert table.assign(["c"]) == ({"c": 2}, {"c": 2})  # b was least recently used
    assert table.assign(["a", "b"]) == ({"a": 1, "b": 2}, {"b": 2})  # a is the oldest but in use: c goes
    with pytest.raises(ValueError, match="3 adapters in one round, only 2 slots"):
        table.assign(["a", "b", "c"])
    assert table.loaded() == {"a": 1, "b": 2}


def test_rounds_keep_arrival_order_and_fill_each_round() -> None:
    assert rounds(["a", "b", "c", None, "a", "c", "d"], 2) == [[0, 1, 3, 4], [2, 5, 6]]
    assert rounds([None, None], 1) == [[0, 1]]
    assert rounds(["a", "b", "c"], 1) == [[0], [1], [2]]
    assert rounds([], 3) == []


# ----------------------------------------------------------------------------- the runner


def test_rows_get_their_adapters_slots_and_scales(store: Path) -> None:
    run, session = runner(store, slots=4)
    merged = step(4) | {
        FLUX_ADAPTER_INPUT: np.array([[b"a"], [b""], [b"b"], [b"a"]], dtype=np.object_),
        SCALE_INPUT: np.array([0.5, 9.0, 1.5, 2.0], np.float32),
    }
    (out,) = run.run(None, merged)
    assert session.runs == [([1, 0, 2, 1], [0.5, 0.0, 1.5, 2.0])]  # no adapter: slot 0, scale 0
    assert out[:, -1, -1].tolist() == [ident(1), 0.0, ident(2), ident(1)]
    assert [s for s, _ in session.loads] == [1, 2]
    run.run(None, merged)
    assert len(session.loads) == 2 and run.loads == 2  # loaded once, used again


def test_lru_eviction_and_more_adapters_than_slots_wait_in_rounds(store: Path) -> None:
    run, session = runner(store, slots=3)  # two adapter slots
    names = [b"a", b"b", b"c", b"", b"d", b"a"]
    merged = step(6) | {
        FLUX_ADAPTER_INPUT: np.array([[n] for n in names], dtype=np.object_),
        SCALE_INPUT: np.ones(6, np.float32),
    }
    (out,) = run.run(None, merged)
    assert len(session.runs) == 2  # rows a, b, none, a first; then c and d
    assert out[:, -1, -1].tolist() == [ident(1), ident(2), ident(3), 0.0, ident(4), ident(1)]
    # every row was answered by the adapter it named, although 4 adapters shared 2 slots
    assert sorted(split_key(k)[0] for k in run.table.loaded()) == ["c", "d"]  # slots hold versions
    (again,) = run.run(None, merged)
    assert np.array_equal(again[:, -1, -1], out[:, -1, -1])


def test_unknown_and_foreign_adapters_fail_alone(store: Path) -> None:
    publish(store, "other-base", 7.0, base="another")
    run, session = runner(store, slots=4)
    merger = BatchedOnnxRunner(run)  # type: ignore[arg-type]
    reqs = [request("a"), request("nope"), request(None), request("other-base"), request("b", 0.5)]
    results = run_checked(merger.run, run.check_request, reqs)
    assert isinstance(results[1], ValueError) and "no adapter named 'nope'" in str(results[1])
    assert isinstance(results[3], ValueError) and "another base model" in str(results[3])
    good = [results[i] for i in (0, 2, 4)]
    assert [float(r["latent"][0, -1, -1]) for r in good] == [ident(1), 0.0, ident(2)]
    assert session.runs == [([1, 0, 2], [1.0, 0.0, 0.5])]  # three requests, three adapters: one pass


def test_republished_name_is_reloaded_and_a_deleted_loaded_adapter_finishes(store: Path) -> None:
    run, session = runner(store, slots=4)
    run.run(None, request("a"))
    delete_adapter(store, "a")
    # a generation that began before the delete keeps its slot ...
    run.check_request(request("a"))
    assert run.run(None, request("a"))[0][0, -1, -1] == ident(1)
    # ... a new one with the name republished gets the new adapter, in a slot of its own
    publish(store, "a", 5.0)
    assert run.run(None, request("a"))[0][0, -1, -1] == ident(5)
    assert [s for s, _ in session.loads] == [1, 2]
    # deleted and not loaded: refused
    delete_adapter(store, "c")
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        run.check_request(request("c"))


def test_a_generation_runs_the_version_it_began_with_across_a_republish(store: Path) -> None:
    run, session = runner(store, slots=3)  # two adapter slots
    first = read_adapter_record(store, "a").sha256
    began = f"a@{first}"
    assert run.run(None, request(began))[0][0, -1, -1] == ident(1)
    delete_adapter(store, "a")
    publish(store, "a", 5.0)  # the same name, other weights, while that generation is under way
    newer = read_adapter_record(store, "a").sha256
    mixed = step(2) | {
        FLUX_ADAPTER_INPUT: np.array([[began.encode()], [f"a@{newer}".encode()]], dtype=np.object_),
        SCALE_INPUT: np.ones(2, np.float32),
    }
    (out,) = run.run(None, mixed)  # its next step and a new generation's, in one batch
    assert out[:, -1, -1].tolist() == [ident(1), ident(5)]
    assert run.run(None, request("a"))[0][0, -1, -1] == ident(5)  # a bare name: the stored version
    run.run(None, request("b"))  # evicts the old version, the least recently used
    assert run.table.slot_of(began) is None
    with pytest.raises(ValueError, match="'a' was replaced"):  # refused, not run on other weights
        run.check_request(request(began))


def test_requests_without_adapter_inputs_run_slot_zero(store: Path) -> None:
    run, session = runner(store, slots=2)
    (out,) = run.run(None, step(2))
    assert session.runs == [([0, 0], [0.0, 0.0])] and out[:, -1, -1].tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------- generate's choice


def test_generate_resolves_the_named_adapter(tmp_path: Path) -> None:
    repo = tmp_path / "model_repository"
    transformer = repo / FLUX_TRANSFORMER / "3"
    transformer.mkdir(parents=True)
    LAYOUT.save(transformer)
    publish(tmp_path / "adapters", "dog", 1.0, trigger="zxq dog", scale=0.8)
    publish(tmp_path / "adapters", "alien", 2.0, base="another")
    resolver = AdapterResolver(repo, transformer)

    plain, choice, extra = resolver.resolve(GenerateParams.build(prompt="a cat", lora_scale=1.5))
    assert plain.prompt == "a cat" and choice.record is None and choice.output_arrays() == {}
    assert extra[FLUX_ADAPTER_INPUT].tolist() == [[b""]] and extra[SCALE_INPUT].tolist() == [[0.0]]

    req, choice, extra = resolver.resolve(GenerateParams.build(prompt="a dog", lora="dog"))
    assert req.prompt == "zxq dog, a dog" and choice.scale == pytest.approx(0.8)
    dog = read_adapter_record(tmp_path / "adapters", "dog")
    assert extra[FLUX_ADAPTER_INPUT].tolist() == [[f"dog@{dog.sha256}".encode()]]  # the version it began with
    assert extra[SCALE_INPUT].dtype == np.float32
    out = choice.output_arrays()
    assert out[ADAPTER_OUTPUT].tolist() == [b"dog"] and len(out[ADAPTER_SHA256_OUTPUT][0]) == 64
    req, choice, extra = resolver.resolve(GenerateParams.build(prompt="zxq DOG runs", lora="dog", lora_scale=0))
    assert req.prompt == "zxq DOG runs" and extra[SCALE_INPUT].tolist() == [[0.0]]

    with pytest.raises(ValueError, match="no adapter named 'cat'"):
        resolver.resolve(GenerateParams.build(prompt="x", lora="cat"))
    with pytest.raises(ValueError, match="another base model"):
        resolver.resolve(GenerateParams.build(prompt="x", lora="alien"))

    plain_repo = AdapterResolver(repo, repo / FLUX_TRANSFORMER / "2")  # a version without the branch
    assert plain_repo.resolve(GenerateParams.build(prompt="x"))[2] == {}  # sends nothing new
    with pytest.raises(ValueError, match="no adapter branch"):
        plain_repo.resolve(GenerateParams.build(prompt="x", lora="dog"))
