"""Export the fine-tuned classifier to ONNX (with a parity check) and build both of its Triton
models' files (publish.classifier writes them into the repository and loads them).

Two models come out: `classifier_onnx` (the encoder + head, token ids in, logits out) and
`classify` (python BLS: tokenizer, call to `classifier_onnx`, softmax, label). BLS rather than an
ensemble because the tokenizer pads each merged batch to its own longest text, which an
ensemble's fixed tensor plumbing cannot express without padding every text to 128 tokens.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from common.ort_session import make_session
from common.paths import written_as_new_file
from contract.specs import (
    CLASSIFIER_ONNX,
    CLASSIFY_LIMITS,
    INLINE_ENCODER_PARAMETER,
    RESCUE_ENCODER_PARAMETER,
    RESCUE_MARGIN_PARAMETER,
    THRESHOLD_PARAMETER,
)
from export import classifier_network  # noqa: F401  (registers the mean-pool head with the Auto classes)
from export.classifier_precision import CPU_GRAPH_RECIPE, PER_CHANNEL, Precision, build_and_choose
from export.deployments import INLINE_ENCODER_FILE, RESCUE_ENCODER_FILE, ExportSettings, classifier_deployments
from export.fingerprints import fingerprint, tree_hashes
from export.triton_config import Deployment, Target

log = logging.getLogger(__name__)

PARITY_SENTENCES = [
    "can I see you in the kitchen?",
    "see you tomorrow",
    "make an image of you in Paris at night, wearing a red coat",
    "lol",
    "I took a nice picture yesterday of the sunset over the lake near my house",
]
ONNX_RECIPE = "torchscript-eager-attention-opset17"
"""How the ONNX graph is made; part of the export's fingerprint, so a change re-exports."""
MAX_PARITY_ERROR = 1e-3
"""Bound on |ONNX - PyTorch| logits; fp32 reorderings give ~1e-6, a broken export gives >1e-1."""


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    max_abs_error: float
    export_seconds: float


def export_classifier_onnx(model_dir: Path, out_path: Path, opset: int = 17) -> OnnxExport:
    """TorchScript-based torch.onnx export with dynamic batch and sequence, then an ORT parity check.

    Eager attention and the TorchScript exporter on purpose: ONNX Runtime's BERT optimizer
    recognises that graph's attention and embedding subgraphs and fuses them (Attention,
    EmbedLayerNormalization; int8 then quantizes attention as QAttention). The dynamo export, with
    eager or SDPA attention alike, leaves attention as ~20 loose ops per layer that no fusion
    matches, and the served graph runs slower for it (docs/decisions/classify-layout-and-fusion.md).
    """
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    wrapped = _LogitsOnly(model).eval()
    sample = tokenizer(PARITY_SENTENCES[:2], padding="max_length", max_length=16, return_tensors="pt")
    names = [t.name for t in CLASSIFIER_ONNX.inputs]
    output = CLASSIFIER_ONNX.outputs[0].name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), written_as_new_file(out_path) as tmp:
        warnings.simplefilter("ignore", category=(FutureWarning, DeprecationWarning, torch.jit.TracerWarning))
        torch.onnx.export(
            wrapped,
            (sample["input_ids"], sample["attention_mask"]),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=[output],
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, output: {0: "batch"}},
        )
    err = classifier_parity(model, tokenizer, out_path)
    if err > MAX_PARITY_ERROR:
        raise RuntimeError(f"ONNX classifier differs from PyTorch by {err:.3g} (> {MAX_PARITY_ERROR})")
    took = time.monotonic() - started
    log.info("classifier ONNX: %s, max |logit diff| = %.3g, %.1fs", out_path, err, took)
    return OnnxExport(out_path, err, took)


def classifier_parity(model: torch.nn.Module, tokenizer: object, onnx_path: Path) -> float:
    """Max abs logit difference on a batch of a size and length the export did not see."""
    enc = tokenizer(
        PARITY_SENTENCES, padding=True, truncation=True, max_length=CLASSIFY_LIMITS.max_tokens, return_tensors="pt"
    )
    with torch.no_grad():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()
    sess = make_session(onnx_path, 0, spinning=True)
    got = sess.run(
        None,
        {
            "input_ids": enc["input_ids"].numpy().astype(np.int64),
            "attention_mask": enc["attention_mask"].numpy().astype(np.int64),
        },
    )[0]
    return float(np.abs(got - ref).max())


def _served_onnx(
    model_dir: Path,
    onnx_path: Path,
    work_dir: Path,
    target: Target,
    requested: Precision,
    rebuilt: bool,
    rescue_margin: float = 0.0,
) -> tuple[Path, Path, dict | None]:
    """The graph `classifier_onnx` serves, the fp32 graph (int8's rescue), and the precision
    report for its manifest.

    CPU: fp32 or int8 by measurement (export/classifier_precision.py), cached per fp32 export and
    requested precision. GPU: the fp32 export, which Triton's TensorRT provider builds in FP16.
    """
    if target != "cpu":
        return onnx_path, onnx_path, None
    cache = work_dir / "precision.json"
    key = {
        "source": (work_dir / "source.fingerprint").read_text(),
        "requested": requested,
        "per_channel": PER_CHANNEL,
        "graph": CPU_GRAPH_RECIPE,
        "rescue_margin": rescue_margin,
    }
    if not rebuilt and cache.exists():
        cached = json.loads(cache.read_text())
        served, fp32 = Path(cached["path"]), Path(cached.get("fp32_path", ""))
        if cached.get("key") == key and served.exists() and fp32.is_file():
            return served, fp32, cached["choice"]
    labels = json.loads((model_dir / "labels.json").read_text())
    cfg = AutoConfig.from_pretrained(model_dir)
    served, fp32, choice = build_and_choose(
        model_dir,
        onnx_path,
        work_dir,
        requested,
        AutoTokenizer.from_pretrained(model_dir),
        cfg.num_attention_heads,
        cfg.hidden_size,
        float(labels.get("temperature", 1.0)),
        rescue_margin,
    )
    cache.write_text(
        json.dumps({"key": key, "path": str(served), "fp32_path": str(fp32), "choice": choice.as_dict()}, indent=2)
    )
    return served, fp32, choice.as_dict()


@dataclass(frozen=True)
class ModelBuild:
    """One Triton model's next version: its deployment, files, provenance and manifest facts."""

    deployment: Deployment
    files: dict[str, Path]
    provenance: dict[str, Any]
    report: dict[str, Any]


@dataclass(frozen=True)
class ClassifierBuild:
    models: dict[str, ModelBuild]
    """`classifier_onnx` and `classify`, in the order Triton must load them."""
    parity_max_abs_logit_error: float
    """ONNX vs PyTorch logits; NaN when the export was reused."""
    precision: dict[str, Any] | None
    """The CPU precision choice (export/classifier_precision.py); None on GPU."""


def build_classifier(
    model_dir: Path, target: Target = "cpu", work_dir: Path | None = None, force: bool = False
) -> ClassifierBuild:
    """Export the classifier in `model_dir` to ONNX when it changed (into `work_dir`, default
    `<model_dir>/../onnx`), choose the served precision, and lay out both models' files."""
    settings = ExportSettings()
    deps = classifier_deployments(settings, target)
    provenance = {"classifier": str(model_dir), "classifier_files": tree_hashes(model_dir), "onnx_recipe": ONNX_RECIPE}
    work_dir = work_dir or model_dir.parent / "onnx"
    onnx_path = work_dir / "model.onnx"
    marker = work_dir / "source.fingerprint"
    fp = fingerprint(provenance)
    parity = float("nan")
    rebuilt = force or not onnx_path.exists() or not marker.exists() or marker.read_text() != fp
    if rebuilt:
        result = export_classifier_onnx(model_dir, onnx_path)
        parity = result.max_abs_error
        marker.write_text(fp)
    inline = INLINE_ENCODER_PARAMETER in deps["classify"].parameters
    served, fp32, precision = _served_onnx(
        model_dir,
        onnx_path,
        work_dir,
        target,
        settings.classifier_precision,
        rebuilt,
        settings.classifier_int8_rescue_margin if inline else 0.0,
    )
    onnx_provenance = {**provenance, "precision": precision["served"] if precision else "fp32"}
    if precision:  # a new CPU graph recipe must publish new versions, as a new precision does
        onnx_provenance["graph"] = CPU_GRAPH_RECIPE
    encoder = ModelBuild(
        deps["classifier_onnx"],
        {"model.onnx": served},
        onnx_provenance,
        {"parity_max_abs_logit_error": parity, "precision": precision},
    )
    # classify runs the same graph itself when inline: its version must change when the graph does
    classify_provenance = onnx_provenance if inline else provenance
    classify = _classify_model(
        model_dir, work_dir, deps["classify"], classify_provenance, inline, served, fp32, precision
    )
    return ClassifierBuild({"classifier_onnx": encoder, "classify": classify}, parity, precision)


def _classify_model(
    model_dir: Path,
    work_dir: Path,
    dep: Deployment,
    provenance: dict[str, Any],
    inline: bool,
    served: Path,
    fp32: Path,
    precision: dict[str, Any] | None,
) -> ModelBuild:
    """`classify`: tokenizer, labels and the uncertainty threshold; when inline, the encoder graph
    too (and, int8 served, the fp32 graph that rescues rows near the boundary)."""
    tok_dir = work_dir / "tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tok_dir)
    # The facade reads the uncertainty threshold from the deployed model's config: one source.
    threshold = json.loads((model_dir / "labels.json").read_text()).get("recommended_threshold", 0.5)
    dep = replace(dep, parameters={**dep.parameters, THRESHOLD_PARAMETER: str(threshold)})
    files = {"tokenizer": tok_dir, "labels.json": model_dir / "labels.json"}
    if inline:
        files[INLINE_ENCODER_FILE] = served
        margin = (precision or {}).get("rescue_margin", 0.0) if served != fp32 else 0.0
        if margin > 0:  # int8 served: fp32 answers the rows near the boundary (common/int8_rescue.py)
            files[RESCUE_ENCODER_FILE] = fp32
            dep = replace(
                dep,
                parameters={
                    **dep.parameters,
                    RESCUE_ENCODER_PARAMETER: RESCUE_ENCODER_FILE,
                    RESCUE_MARGIN_PARAMETER: str(margin),
                },
            )
            provenance = {**provenance, "rescue_margin": margin}
    return ModelBuild(dep, files, provenance, {"test_accuracy": recorded_test_accuracy(model_dir)})


def recorded_test_accuracy(model_dir: Path) -> float | None:
    """The test-split accuracy `fluxserve-train` recorded beside a trained classifier, if any."""
    path = Path(model_dir) / "metrics.json"
    try:
        return float(json.loads(path.read_text())["test"]["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
