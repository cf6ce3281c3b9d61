"""publish/adapters.py: a LoRA file into the adapter store against the served bank layout (tiny FLUX)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.adapter_bank import AdapterRefused, BankLayout  # noqa: E402
from common.adapter_store import (  # noqa: E402
    AdapterExists,
    InvalidAdapterName,
    adapters_dir,
    list_adapters,
    read_adapter_record,
    read_factors,
)
from contract.specs import FLUX_TRANSFORMER  # noqa: E402
from export.fingerprints import sha256_file  # noqa: E402
from export.flux.adapter_bank import read_adapter  # noqa: E402
from export.flux.lora import build_local_lora, lora_target_modules  # noqa: E402
from export.flux_build import base_transformer_fingerprint  # noqa: E402
from publish.adapters import publish_adapter, served_bank_layout  # noqa: E402

RANK = 8


@pytest.fixture(scope="module")
def layout(tiny_checkpoint: Path) -> BankLayout:
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_checkpoint / "transformer")
    return BankLayout.build(
        lora_target_modules(transformer), RANK, "grouped", base_transformer_fingerprint(tiny_checkpoint)
    )


@pytest.fixture()
def repo(tmp_path: Path, layout: BankLayout) -> Path:
    """A model repository whose newest flux_transformer (version 2) serves `layout`."""
    repo = tmp_path / "model_repository"
    (repo / FLUX_TRANSFORMER / "1").mkdir(parents=True)  # an older version without the branch
    (repo / FLUX_TRANSFORMER / "2").mkdir()
    layout.save(repo / FLUX_TRANSFORMER / "2")
    return repo


def test_a_trained_lora_becomes_an_adapter(repo: Path, layout: BankLayout, tiny_lora: Path) -> None:
    record = publish_adapter(tiny_lora, "my-dog", owner="alice", scale=0.75, repository=repo, source="job-1")
    assert record == read_adapter_record(adapters_dir(repo), "my-dog")
    manifest = json.loads((tiny_lora / "fluxserve_lora.json").read_text())
    assert record.trigger_words == manifest["trigger_word"]
    assert (record.rank, record.scale, record.owner, record.source) == (4, 0.75, "alice", "job-1")
    assert record.base_fingerprint == layout.base_fingerprint != ""
    assert record.sha256 == sha256_file(tiny_lora / "pytorch_lora_weights.safetensors")
    expected = read_adapter(tiny_lora, layout)
    assert record.layers == len(expected.factors) == len(layout.layers)
    assert record.tensor_bytes == expected.nbytes
    stored = read_factors(adapters_dir(repo), "my-dog")
    for path, (a, b) in expected.factors.items():
        np.testing.assert_array_equal(stored[path][0], a)
        np.testing.assert_array_equal(stored[path][1], b)
    # the weights file itself is accepted too, with trigger words given
    other = publish_adapter(tiny_lora / "pytorch_lora_weights.safetensors", "dog-2", "zxq", repository=repo)
    assert (other.trigger_words, other.sha256) == ("zxq", record.sha256)
    assert sorted(r.name for r in list_adapters(adapters_dir(repo))) == ["dog-2", "my-dog"]


def test_refusals_name_the_limit(repo: Path, tiny_checkpoint: Path, tiny_lora: Path, tmp_path: Path) -> None:
    too_high = build_local_lora(tiny_checkpoint, tmp_path / "rank9", rank=RANK + 1, seed=2)
    with pytest.raises(AdapterRefused, match=f"rank {RANK + 1} exceeds the adapter bank's max rank {RANK}"):
        publish_adapter(too_high, "too-high", repository=repo)
    other_base = tmp_path / "other-base"
    (other_base / "transformer").mkdir(parents=True)
    (other_base / "transformer" / "config.json").write_text('{"num_layers": 99}')
    with pytest.raises(AdapterRefused, match="another base model"):
        publish_adapter(tiny_lora, "elsewhere", repository=repo, base_checkpoint=other_base)
    gone = build_local_lora(tiny_checkpoint, tmp_path / "gone-base", rank=2, seed=3)
    manifest = json.loads((gone / "fluxserve_lora.json").read_text())
    (gone / "fluxserve_lora.json").write_text(json.dumps({**manifest, "base_checkpoint": str(tmp_path / "nowhere")}))
    with pytest.raises(AdapterRefused, match="another base model"):
        publish_adapter(gone, "gone", repository=repo)
    with pytest.raises(InvalidAdapterName):
        publish_adapter(tiny_lora, "../escape", repository=repo)
    with pytest.raises(FileNotFoundError):
        publish_adapter(tmp_path / "missing", "missing", repository=repo)
    assert list_adapters(adapters_dir(repo)) == []  # nothing refused was written
    publish_adapter(tiny_lora, "taken", repository=repo)
    with pytest.raises(AdapterExists, match="taken"):
        publish_adapter(tiny_lora, "taken", repository=repo)


def test_a_repository_without_the_branch_is_refused(tmp_path: Path, tiny_lora: Path) -> None:
    repo = tmp_path / "model_repository"
    with pytest.raises(AdapterRefused, match="build the models first"):
        served_bank_layout(repo)
    (repo / FLUX_TRANSFORMER / "3").mkdir(parents=True)
    with pytest.raises(AdapterRefused, match="version 3\\) has no adapter branch"):
        publish_adapter(tiny_lora, "x", repository=repo)
