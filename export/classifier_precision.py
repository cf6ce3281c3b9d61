"""fp32 or int8 for the CPU classifier, chosen by measurement on the model's own test split.

From the exported fp32 graph we build:
- `fused.onnx`: ONNX Runtime's transformer optimizer (BERT fusions: EmbedLayerNormalization,
  Attention, BiasGelu on the export in export/classifier.py) when it fuses something, with its
  SkipLayerNormalization nodes split back into Add + LayerNormalization (faster on CPU, see
  `split_skip_layer_norm`); otherwise the plain export is the fp32 model.
- `int8.onnx`: `quant_pre_process` (shape inference + graph clean-up, as ORT recommends before
  quantizing) then `quantize_dynamic` with QInt8 per-channel weights; activations are quantized per batch at
  run time, so no calibration data is needed.

Both are scored on the test split the training run saved next to the model (`test_split.jsonl`),
with the calibrated softmax the service applies. int8 serves only if its accuracy is within
`max_accuracy_drop` of fp32; a setting can force either (`FLUXSERVE_EXPORT_CLASSIFIER_PRECISION`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from common.chat_text import normalized, recorded_normalizer
from common.int8_rescue import near_boundary
from common.ort_session import make_session
from common.paths import written_as_new_file
from contract.specs import CLASSIFY_LIMITS, LABELS

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "int8"]
TEST_SPLIT_FILE = "test_split.jsonl"
"""Written by training next to the model: the messages no training or calibration step saw."""
PER_CHANNEL = True
"""One scale per output column of each weight: on the shipped model's test messages per-tensor
int8 flipped a label (so fp32 would be served) and moved scores more (docs/benchmarks.md,
"Classifier precision")."""
MAX_ACCURACY_DROP = 0.005
"""int8 may cost at most half a point of test accuracy (the issue's bar)."""
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "FastGelu",
    "BiasGelu",
    "Gelu",
)


@dataclass(frozen=True)
class PrecisionChoice:
    served: Literal["fp32", "int8"]
    reason: str
    requested: Precision
    fp32_accuracy: float | None
    int8_accuracy: float | None
    n_test: int
    label_agreement: float | None
    """Share of test messages where int8 and fp32 give the same label."""
    max_abs_score_diff: float | None
    """Largest |int8 - fp32| calibrated score on the test split."""
    fused_ops: dict[str, int]
    fp32_bytes: int
    int8_bytes: int | None
    rescue_margin: float = 0.0
    """int8's logit margin below which `classify` re-encodes a row in fp32 (0: plain int8)."""
    int8_unrescued_accuracy: float | None = None
    """int8 alone, without the rescue (`int8_accuracy` is as served)."""
    rescued_test_rows: int = 0
    """Test messages the rescue re-encoded in fp32."""

    def as_dict(self) -> dict:
        return asdict(self)


def read_test_split(model_dir: Path) -> tuple[list[str], np.ndarray] | None:
    path = model_dir / TEST_SPLIT_FILE
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], np.array([LABELS.index(r["label"]) for r in rows], dtype=np.int64)


def _op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in FUSED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def fuse_transformer(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """BERT fusions from onnxruntime.transformers; returns the fused op counts ({} = nothing fused)."""
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        # opt_level 0: only the fusions here; ORT's own level-99 optimizations run at load anyway.
        model = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
        split = split_skip_layer_norm(model.model)
        with written_as_new_file(dst) as tmp:
            model.save_model_to_file(str(tmp))
    except Exception as e:  # the optimizer's pattern matching is best effort on new exporters
        log.warning("transformer fusions failed on %s, keeping the plain export: %s", src.name, e)
        return {}
    counts = _op_counts(dst)
    if split:
        counts[SPLIT_SKIP_LAYER_NORM] = split
    return counts


CPU_GRAPH_RECIPE = "bert-fusions/split-skip-layer-norm"
"""How the CPU graphs are built from the export; in the build cache's key and the published
fingerprint, so changing the recipe rebuilds and publishes new versions."""
SPLIT_SKIP_LAYER_NORM = "SkipLayerNormalization->Add+LayerNormalization"
"""How `fused_ops` records the SkipLayerNormalization nodes the export split back (see below)."""


def split_skip_layer_norm(model: onnx.ModelProto) -> int:
    """Rewrite each SkipLayerNormalization as Add (input + skip [+ bias]) and LayerNormalization.

    Same arithmetic, but ONNX Runtime's CPU SkipLayerNormalization kernel is the slow way to run
    it, and it was the largest share of the int8 encoder's time (docs/decisions/skiplayernorm-split.md).
    The transformer optimizer's Attention fusion needs the fused node to match, so we fuse first and
    split after. ORT's own SkipLayerNormFusion does not put it back on load
    (tests/integration/test_triton_classify.py checks the served graph). Nodes that expose
    their mean or variance outputs stay fused.
    Returns how many nodes were split (0 when the opset predates LayerNormalization).
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 17:
        return 0
    nodes: list[onnx.NodeProto] = []
    split = 0
    for node in model.graph.node:
        outs = list(node.output) + [""] * (4 - len(node.output))
        if node.op_type != "SkipLayerNormalization" or outs[1] or outs[2]:
            nodes.append(node)
            continue
        x, skip, gamma, beta, bias = (list(node.input) + [""] * 5)[:5]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        total = outs[3] or f"{node.name}_sum"
        if bias:
            nodes.append(onnx.helper.make_node("Add", [x, skip], [f"{node.name}_skip_sum"], name=f"{node.name}_add"))
            nodes.append(
                onnx.helper.make_node("Add", [f"{node.name}_skip_sum", bias], [total], name=f"{node.name}_bias")
            )
        else:
            nodes.append(onnx.helper.make_node("Add", [x, skip], [total], name=f"{node.name}_add"))
        ln_inputs = [total, gamma] + ([beta] if beta else [])
        nodes.append(
            onnx.helper.make_node(
                "LayerNormalization", ln_inputs, [outs[0]], name=f"{node.name}_ln", axis=-1, epsilon=eps
            )
        )
        split += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return split


def quantize_int8(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prep = (dst.parent / (dst.stem + ".prep.onnx")).resolve()
    src, dst = src.resolve(), dst.resolve()
    # onnx's external-data helper leaves a ~90 MB `<uuid>.data` in the working directory on
    # every pre-processing run: run it where that litter is removed with the folder.
    with tempfile.TemporaryDirectory(prefix="fluxserve-quant-") as tmp, contextlib.chdir(tmp):
        _pre_process(src, prep)
        with written_as_new_file(dst) as out:
            quantize_dynamic(
                str(prep),
                str(out),
                weight_type=QuantType.QInt8,
                per_channel=PER_CHANNEL,
                # ONNX's shape inference cannot type the outputs of ORT's fused ops (Attention,
                # EmbedLayerNormalization): what it cannot type is float32, as everything there is.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    prep.unlink(missing_ok=True)
    return dst


def _pre_process(src: Path, prep: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(prep), skip_symbolic_shape=False)
    except Exception as e:
        # The dynamo export's Min(512, sequence) position slicing defeats symbolic shape inference;
        # ONNX's own shape inference and ORT's graph clean-up still run.
        log.info("symbolic shape inference failed (%s); pre-processing without it", e)
        quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)


def score_onnx(
    path: Path,
    tokenizer: object,
    texts: list[str],
    temperature: float,
    batch_size: int = 32,
    rescue: Rescue | None = None,
) -> np.ndarray:
    """Calibrated class probabilities for `texts`, tokenized as the service does (pad to longest);
    with `rescue`, rows near the boundary take the fp32 graph's logits, as `classify` does."""
    return _calibrated(score_logits(path, tokenizer, texts, batch_size, rescue)[0], temperature)


def _calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Rescue:
    fp32: Path
    margin: float


def score_logits(
    path: Path, tokenizer: object, texts: list[str], batch_size: int = 32, rescue: Rescue | None = None
) -> tuple[np.ndarray, int]:
    """Raw logits per text, and how many rows the rescue re-encoded in fp32."""
    sess = make_session(path, 0, spinning=True)
    exact = make_session(rescue.fp32, 0, spinning=True) if rescue else None
    out, rescued = [], 0
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            padding="longest",
            truncation=True,
            max_length=CLASSIFY_LIMITS.max_tokens,
            return_tensors="np",
        )
        feeds = {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
        }
        logits = sess.run(None, feeds)[0]
        rows = near_boundary(logits, rescue.margin) if rescue else np.zeros(0, dtype=np.intp)
        if exact is not None and rows.size:
            logits[rows] = exact.run(None, {k: v[rows] for k, v in feeds.items()})[0]
            rescued += rows.size
        out.append(logits)
    return (np.concatenate(out) if out else np.zeros((0, len(LABELS)), np.float32)), rescued


def choose(
    requested: Precision, fp32_acc: float | None, int8_acc: float | None, max_drop: float = MAX_ACCURACY_DROP
) -> tuple[Literal["fp32", "int8"], str]:
    if requested == "fp32":
        return "fp32", "forced by setting"
    if requested == "int8":
        return "int8", "forced by setting"
    if fp32_acc is None or int8_acc is None:
        return "fp32", "no test split next to the model to measure int8 against"
    drop = fp32_acc - int8_acc
    if drop <= max_drop + 1e-12:
        return "int8", f"int8 test accuracy {int8_acc:.4f} within {max_drop * 100:.1f} points of fp32 {fp32_acc:.4f}"
    return (
        "fp32",
        f"int8 test accuracy {int8_acc:.4f} is {drop * 100:.2f} points below fp32 {fp32_acc:.4f} (> {max_drop * 100:.1f})",
    )


def build_and_choose(
    model_dir: Path,
    raw_fp32: Path,
    work_dir: Path,
    requested: Precision,
    tokenizer: object,
    num_heads: int,
    hidden_size: int,
    temperature: float,
    rescue_margin: float = 0.0,
) -> tuple[Path, Path, PrecisionChoice]:
    """Build the fp32 (fused when it helps) and int8 graphs, score both, and return the graph to
    serve, the fp32 graph (int8's rescue, when `rescue_margin` > 0) and the choice.

    int8 is scored as `classify` serves it: with the fp32 second opinion near the boundary when
    `rescue_margin` > 0 (common/int8_rescue.py); its plain accuracy is recorded beside."""
    fused = work_dir / "fused.onnx"
    fused_ops = fuse_transformer(raw_fp32, fused, num_heads, hidden_size)
    fp32 = fused if fused_ops else raw_fp32
    test = read_test_split(model_dir)
    normalize = recorded_normalizer(model_dir / "labels.json")
    int8: Path | None = None
    if requested != "fp32":
        int8 = quantize_int8(fp32, work_dir / "int8.onnx")
    rescue = Rescue(fp32, rescue_margin) if rescue_margin > 0 else None
    fp32_acc = int8_acc = plain_acc = agree = diff = None
    rescued = 0
    if test is not None:
        texts, y = normalized(test[0], normalize), test[1]
        p32 = score_onnx(fp32, tokenizer, texts, temperature)
        fp32_acc = float((p32.argmax(1) == y).mean())
        if int8 is not None:
            plain_acc = float((score_onnx(int8, tokenizer, texts, temperature).argmax(1) == y).mean())
            logits, rescued = score_logits(int8, tokenizer, texts, rescue=rescue)
            p8 = _calibrated(logits, temperature)
            int8_acc = float((p8.argmax(1) == y).mean())
            agree = float((p8.argmax(1) == p32.argmax(1)).mean())
            diff = float(np.abs(p8 - p32).max())
    served, reason = choose(requested, fp32_acc, int8_acc)
    choice = PrecisionChoice(
        served=served,
        reason=reason,
        requested=requested,
        fp32_accuracy=fp32_acc,
        int8_accuracy=int8_acc,
        n_test=len(test[0]) if test else 0,
        label_agreement=agree,
        max_abs_score_diff=diff,
        fused_ops=fused_ops,
        fp32_bytes=fp32.stat().st_size,
        int8_bytes=int8.stat().st_size if int8 else None,
        rescue_margin=rescue_margin if int8 is not None else 0.0,
        int8_unrescued_accuracy=plain_acc,
        rescued_test_rows=rescued,
    )
    log.info("classifier precision: serving %s (%s)", served, reason)
    return (int8 if served == "int8" else fp32), fp32, choice
