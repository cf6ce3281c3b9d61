"""A LoRA into the adapter store (issue 27): served by name, per request, with no model load.

`publish_adapter` reads the LoRA (the trainer's diffusers/PEFT file, or a Kohya / ai-toolkit one:
whatever diffusers' FLUX loader reads) against the bank layout of the transformer the repository
serves (its newest `flux_transformer` version's `adapter_bank.json`), refuses what that bank
cannot hold (a rank above R, a layer outside the branch set, weights for other components,
another base model) with the limit in the message, and writes the adapter's record, bank-ready
factors and the LoRA file itself into the store (common.adapter_store). The next `generate`
request naming it loads it into a bank slot.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.adapter_bank import AdapterRefused, BankLayout
from common.adapter_store import (
    AdapterExists,
    AdapterRecord,
    adapter_exists,
    adapters_dir,
    check_name,
    utc_now_iso,
    write_adapter,
)
from common.flux_assets import LORA_WEIGHT_NAME, read_lora_manifest
from contract.specs import FLUX_TRANSFORMER
from export.fingerprints import sha256_file
from publish.repository import versions

log = logging.getLogger(__name__)


def served_bank_layout(repository: Path) -> BankLayout:
    """The bank layout of the newest `flux_transformer` version in `repository`; AdapterRefused
    when it serves no adapter branch."""
    found = versions(repository, FLUX_TRANSFORMER)
    if not found:
        raise AdapterRefused(f"{repository} has no {FLUX_TRANSFORMER}: build the models first")
    folder = Path(repository) / FLUX_TRANSFORMER / str(found[-1])
    if not BankLayout.exists(folder):
        raise AdapterRefused(
            f"the served {FLUX_TRANSFORMER} (version {found[-1]}) has no adapter branch: "
            "export it with FLUXSERVE_FLUX_ADAPTER_BRANCH=true to serve adapters"
        )
    return BankLayout.load(folder)


def lora_file(lora: Path, weight_name: str | None = None) -> Path:
    """The weights file of a LoRA given as a file or as a folder (the trainer's output folder)."""
    lora = Path(lora)
    if lora.is_file():
        return lora
    if lora.is_dir():
        if weight_name is not None:
            return lora / weight_name
        if (lora / LORA_WEIGHT_NAME).is_file():
            return lora / LORA_WEIGHT_NAME
        candidates = sorted(lora.glob("*.safetensors"))
        if len(candidates) == 1:
            return candidates[0]
        raise AdapterRefused(f"{lora.name}: expected {LORA_WEIGHT_NAME} or exactly one .safetensors file")
    raise FileNotFoundError(f"no LoRA at {lora}")


def _check_base(layout: BankLayout, lora: Path, base_checkpoint: str | Path | None) -> None:
    """Refuse a LoRA whose base model (given, or named by the trainer's manifest) is not the one
    the served transformer was exported from."""
    from export.flux_build import base_transformer_fingerprint

    base = base_checkpoint or read_lora_manifest(lora).get("base_checkpoint")
    if not base or not layout.base_fingerprint:
        return  # a LoRA from elsewhere names no base: its layers' shapes are the check left
    if Path(str(base)).exists() or base_checkpoint is not None:
        theirs = base_transformer_fingerprint(base)
    else:  # trained on a checkpoint this machine no longer has: it cannot be this one's base
        theirs = f"missing:{base}"
    if theirs != layout.base_fingerprint:
        raise AdapterRefused(
            f"the LoRA was trained on another base model ({base}, fingerprint {theirs}) than the served "
            f"transformer's (fingerprint {layout.base_fingerprint})"
        )


def publish_adapter(
    lora_path: str | Path,
    name: str,
    trigger_words: str | None = None,
    owner: str | None = None,
    scale: float = 1.0,
    repository: Path | None = None,
    base_checkpoint: str | Path | None = None,
    weight_name: str | None = None,
    source: str | None = None,
) -> AdapterRecord:
    """Convert the LoRA at `lora_path` (a file, or the trainer's output folder) for the served bank
    and write it into the adapter store beside `repository` (default: the project's model
    repository) as `name`. `trigger_words` default: the trainer's manifest's trigger word.
    Raises AdapterRefused (what the bank cannot hold, naming the limit), AdapterExists,
    InvalidAdapterName, FileNotFoundError."""
    from common.paths import MODEL_REPOSITORY
    from export.flux.adapter_bank import read_adapter

    repository = Path(repository or MODEL_REPOSITORY)
    root = adapters_dir(repository)
    check_name(name)
    if adapter_exists(root, name):  # before the conversion's work; write_adapter checks again
        raise AdapterExists(name)
    lora = Path(lora_path)
    weights = lora_file(lora, weight_name)
    layout = served_bank_layout(repository)
    _check_base(layout, lora, base_checkpoint)
    adapter = read_adapter(weights, layout)
    manifest = read_lora_manifest(lora)
    record = AdapterRecord(
        name=name,
        trigger_words=str(manifest.get("trigger_word") or "") if trigger_words is None else trigger_words,
        rank=adapter.rank,
        scale=scale,
        owner=owner,
        base_fingerprint=layout.base_fingerprint,
        sha256=sha256_file(weights),
        created=utc_now_iso(),
        layers=len(adapter.factors),
        tensor_bytes=adapter.nbytes,
        source=source or str(lora),
    )
    write_adapter(root, record, adapter.factors, weights)
    log.info("adapter %s published (rank %d, %d layers, sha256 %s)", name, record.rank, record.layers, record.sha256)
    return record
