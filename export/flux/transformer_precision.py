"""fp32 or int8 for the CPU transformer, chosen by measurement on generated images.

The transformer is compute-bound fp32 GEMMs; ONNX Runtime's integer GEMMs (VNNI/AMX on this CPU) run
them faster (docs/decisions/int8-flux-transformer.md). From the fp32 export (per-tensor weights,
weight map) we build `int8/`: ORT's MMDiT fusions (`fuse`), then `quantize_dynamic` with QInt8
per-channel weights on every MatMul (ORT's quantizer turns the Gemm(transB=1) layers into MatMul on
a transposed copy `<W>_Transposed` first); activations are quantized per call, so no calibration
data is needed. Not measured to help, so not done: `quant_pre_process` (the plain quantization is
already within the bound below) and the VAE decoder (dynamic int8 Conv ran slower than fp32:
ConvInteger has no fast kernel).

Auto serves int8 only when it is faster and its images stay close to fp32's: a few seeded
prompts run through the whole loop (FluxLoop; PyTorch CLIP/T5/VAE, the ONNX transformer in each
precision), and every image must be within MAX_MEAN_ABS_PIXEL mean |difference| (0..255) and
MIN_PSNR_DB of the fp32 one. Both graphs, the figures and the reason are written to
`precision.json` beside the export and land in the version's manifest. The GPU target keeps fp32
(TensorRT builds its own engine from it).

A LoRA publish patches the int8 graph too: export.flux.int8_patch requantizes only the changed
tensors, bit for bit what quantizing the whole patched fp32 graph would give.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from contract.specs import FLUX_TRANSFORMER
from export.flux.image_bounds import MAX_LATENT_RELATIVE_ERROR, MAX_MEAN_ABS_PIXEL, MIN_PSNR_DB
from export.flux.weight_map import WEIGHTS_DIR, _tensor_bytes, save_per_tensor

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "int8"]
INT8_DIR = "int8"
"""The int8 graph's folder inside a transformer export (model.onnx + weights/)."""
PRECISION_FILE = "precision.json"
ONNX_FILE = "model.onnx"
INT8_RECIPE = "mmdit-fusions+quantize_dynamic-qint8-per-channel-matmul/2"
"""In the transformer's provenance: a change of how int8 is built rebuilds the export."""
PER_CHANNEL = True
"""One scale per output column: a little closer to fp32 and a little faster than one per tensor on
the small model (docs/benchmarks.md, "Generation")."""
QUANT_OPS = ("MatMul",)
"""The LoRA-targeted (and compute-heavy) layers; Gather/Conv/... stay fp32."""
QUANT_SUFFIXES = ("_quantized", "_scale", "_zero_point")
TRANSPOSED = "_Transposed"
"""ORT's quantizer rewrites Gemm(transB=1) into MatMul over `<W>_Transposed`."""
PARITY_PROMPTS = ("a red fox in the snow", "portrait of an old sailor, film grain", "a bowl of ramen, studio light")
PARITY_SIZE = 256
PARITY_STEPS = 4
TIMING_ROUNDS = 5


@dataclass(frozen=True)
class PrecisionChoice:
    served: Literal["fp32", "int8"]
    reason: str
    requested: Precision
    images: int
    image_size: int
    steps: int
    mean_abs_pixel_diff: list[float] | None
    """Per image, int8 vs fp32, in 0..255 pixel units."""
    psnr_db: list[float] | None
    latent_relative_error: list[float] | None
    """Per image, ||int8 - fp32|| / ||fp32|| of the latents the VAE decodes."""
    fp32_transformer_ms_per_step: float | None
    int8_transformer_ms_per_step: float | None
    bound: dict[str, float]
    fp32_bytes: int
    int8_bytes: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_choice(export_dir: Path) -> dict[str, Any] | None:
    """The choice recorded beside a transformer export (None: fp32 only, nothing chosen)."""
    path = Path(export_dir) / PRECISION_FILE
    return json.loads(path.read_text()) if path.exists() else None


def served_dir(export_dir: Path) -> Path:
    """The folder whose model.onnx + weights/ Triton serves: int8/ when int8 was chosen."""
    choice = read_choice(export_dir)
    return Path(export_dir) / INT8_DIR if choice and choice["served"] == "int8" else Path(export_dir)


def load_with_weights(path: Path) -> onnx.ModelProto:
    """The model with every initializer's bytes inline, read file by file. onnx.load refuses
    external files with several hard links, which is exactly how versions share weights."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            data = _tensor_bytes(tensor, Path(path).parent)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = data
    return model


def is_quant_param(name: str) -> bool:
    return name.endswith(QUANT_SUFFIXES)


@contextlib.contextmanager
def _quiet_root() -> Iterator[None]:
    """ORT's quantizer logs a line per tensor on the root logger at INFO: hundreds per export."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_model(model: onnx.ModelProto, out_path: Path) -> None:
    """`quantize_dynamic` with this module's options, saved with external data (any size)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer's shape inference may leave a `<uuid>.data` in the working directory.
    with tempfile.TemporaryDirectory(prefix="fluxserve-quant-") as tmp, contextlib.chdir(tmp), _quiet_root():
        quantize_dynamic(
            model,
            str(Path(out_path).resolve()),
            op_types_to_quantize=list(QUANT_OPS),
            per_channel=PER_CHANNEL,
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
        )


def fuse(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's MMDiT fusions (RMSNorm -> SimplifiedLayerNormalization, tanh GELU ->
    FastGelu, LayerNormalization); they leave every MatMul/Gemm and its weight as they are, so
    the weight map and the per-tensor requantization still hold. They make a step faster in both
    precisions (docs/benchmarks.md, "Generation")."""
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        # opt_level 0: only the fusions; ORT's own graph optimizations run at session load anyway.
        fused = optimize_model(model, model_type="mmdit", num_heads=0, hidden_size=0, opt_level=0).model
    except Exception as e:  # pattern matching is best effort on new exporters
        log.warning("transformer fusions failed, quantizing the plain export: %s", e)
        return model
    if not any(o.domain == "com.microsoft" for o in fused.opset_import):  # the fused ops' domain
        fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return fused


def quantize_export(fp32_dir: Path, int8_dir: Path) -> Path:
    """int8_dir/model.onnx (fused, then quantized) with per-tensor weights, every quantization
    parameter in its own file (a LoRA patch rewrites scales too, and must never have to rewrite
    model.onnx)."""
    fp32_dir, int8_dir = Path(fp32_dir), Path(int8_dir)
    shutil.rmtree(int8_dir, ignore_errors=True)
    int8_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="fluxserve-int8-", dir=int8_dir.parent) as tmp:
        staged = Path(tmp) / ONNX_FILE
        quantize_model(fuse(load_with_weights(fp32_dir / ONNX_FILE)), staged)
        graph = onnx.load(str(staged), load_external_data=False)
        save_per_tensor(graph, int8_dir / ONNX_FILE, source_dir=Path(tmp), always_external=is_quant_param)
    return int8_dir / ONNX_FILE


def _folder_bytes(model_path: Path) -> int:
    folder = Path(model_path).parent
    return model_path.stat().st_size + sum(f.stat().st_size for f in (folder / WEIGHTS_DIR).glob("*"))


def _onnx_forward(path: Path, record: list) -> tuple[Callable[..., tuple[Any]], Any]:
    """(a FluxTransformer2DModel.forward that runs the ONNX graph at `path` on one intra-op
    thread and remembers its last feeds in `record`, its ONNX Runtime session)."""
    import torch

    from common.adapter_bank import zero_branch_feeds
    from common.ort_session import make_session
    from contract.specs import FLUX_IO_NAMES

    session = make_session(path, 1, spinning=True)
    graph_inputs = session.get_inputs()
    present = {i.name for i in graph_inputs}
    names = [n for n in FLUX_IO_NAMES[FLUX_TRANSFORMER][0] if n in present]

    def forward(hidden_states: torch.Tensor, **kw: Any) -> tuple[torch.Tensor]:
        b = hidden_states.shape[0]
        guidance = kw.get("guidance")
        values = {
            "hidden_states": hidden_states,
            "encoder_hidden_states": kw["encoder_hidden_states"],
            "pooled_projections": kw["pooled_projections"],
            "timestep": kw["timestep"],
            # The graph is batch-major (export.flux.onnx_export); the pipeline passes 2-D ids.
            "img_ids": kw["img_ids"][None].expand(b, -1, -1),
            "txt_ids": kw["txt_ids"][None].expand(b, -1, -1),
            "guidance": guidance if guidance is not None else torch.zeros(b),
        }
        feeds = {n: np.ascontiguousarray(values[n].detach().numpy(), dtype=np.float32) for n in names}
        # The transformer with the adapter branch is measured as a request without one runs it: slot 0.
        feeds |= zero_branch_feeds(graph_inputs, b)
        record[:] = [feeds]
        return (torch.from_numpy(session.run(None, feeds)[0]),)

    return forward, session


def image_parity(
    checkpoint_dir: Path, pipeline: Any, fp32_path: Path, int8_path: Path
) -> tuple[list[float], list[float], list[float], float, float]:
    """(mean abs pixel diff per image, PSNR per image, latent relative error per image, fp32 ms,
    int8 ms per transformer step).

    The images come from diffusers' FluxPipeline (what the serving loop reproduces bit for bit,
    tests/unit/test_flux_loop.py) with its transformer's forward running each ONNX graph.
    Step times are the best of TIMING_ROUNDS alternating calls on the same inputs (a real step's),
    one intra-op thread: on a shared machine that is the figure other load disturbs least."""
    import torch

    from common.flux_assets import read_max_sequence_length

    transformer = pipeline.transformer
    records: dict[str, list] = {"fp32": [], "int8": []}
    built = {tag: _onnx_forward(p, records[tag]) for tag, p in (("fp32", fp32_path), ("int8", int8_path))}
    images: dict[str, list[np.ndarray]] = {}
    latents: dict[str, list[np.ndarray]] = {tag: [] for tag in built}
    vae, decode = pipeline.vae, pipeline.vae.decode
    try:
        for tag, (forward, _) in built.items():
            transformer.forward = forward  # an instance attribute: nn.Module.__call__ runs it

            def decode_recording(z: torch.Tensor, *args: Any, _seen: list = latents[tag], **kwargs: Any) -> Any:
                _seen.append(z.detach().numpy().astype(np.float64))
                return decode(z, *args, **kwargs)

            vae.decode = decode_recording
            images[tag] = [
                pipeline(
                    prompt,
                    height=PARITY_SIZE,
                    width=PARITY_SIZE,
                    num_inference_steps=PARITY_STEPS,
                    guidance_scale=3.5,
                    generator=torch.Generator().manual_seed(seed),
                    max_sequence_length=read_max_sequence_length(checkpoint_dir),
                    output_type="np",
                ).images[0]
                * 255.0
                for seed, prompt in enumerate(PARITY_PROMPTS)
            ]
    finally:
        del transformer.forward
        del vae.decode
    best = {tag: float("inf") for tag in built}
    feeds = records["int8"][0]
    for _ in range(TIMING_ROUNDS):
        for tag, (_, session) in built.items():
            started = time.perf_counter()
            session.run(None, feeds)
            best[tag] = min(best[tag], 1000 * (time.perf_counter() - started))
    mad, psnr = [], []
    for a, b in zip(images["fp32"], images["int8"]):
        a, b = np.round(a).astype(np.float64), np.round(b).astype(np.float64)  # as saved: uint8
        mad.append(round(float(np.abs(a - b).mean()), 4))
        mse = float(np.mean((a - b) ** 2))
        psnr.append(round(float(10 * np.log10(255.0**2 / mse)) if mse > 0 else float("inf"), 2))
    latent_error = [
        round(float(np.linalg.norm(b - a) / np.linalg.norm(a)), 5) for a, b in zip(latents["fp32"], latents["int8"])
    ]
    return mad, psnr, latent_error, round(best["fp32"], 1), round(best["int8"], 1)


def choose(
    requested: Precision,
    mad: list[float] | None,
    psnr: list[float] | None,
    fp32_ms: float | None,
    int8_ms: float | None,
    latent_error: list[float] | None = None,
) -> tuple[Literal["fp32", "int8"], str]:
    if requested == "fp32":
        return "fp32", "forced by setting"
    if requested == "int8":
        return "int8", "forced by setting"
    if not mad or not psnr or fp32_ms is None or int8_ms is None:
        return "fp32", "int8 images not measured"
    if max(mad) > MAX_MEAN_ABS_PIXEL or min(psnr) < MIN_PSNR_DB:
        return "fp32", (
            f"int8 images too far from fp32: mean abs pixel diff up to {max(mad):.2f} (bound {MAX_MEAN_ABS_PIXEL}), "
            f"PSNR down to {min(psnr):.1f} dB (bound {MIN_PSNR_DB})"
        )
    if latent_error is not None and max(latent_error) > MAX_LATENT_RELATIVE_ERROR:
        return "fp32", (
            f"int8 latents too far from fp32: relative error up to {max(latent_error):.3f} "
            f"(bound {MAX_LATENT_RELATIVE_ERROR})"
        )
    if int8_ms >= fp32_ms:
        return "fp32", f"int8 not faster here ({int8_ms:.0f} vs {fp32_ms:.0f} ms per transformer step)"
    latents = f", latents within {max(latent_error):.3f} relative" if latent_error is not None else ""
    return "int8", (
        f"int8 images within {max(mad):.2f} mean abs pixel diff and {min(psnr):.1f} dB PSNR of fp32{latents} "
        f"(bounds {MAX_MEAN_ABS_PIXEL}, {MIN_PSNR_DB} dB, {MAX_LATENT_RELATIVE_ERROR}); "
        f"{int8_ms:.0f} vs {fp32_ms:.0f} ms per transformer step"
    )


def build_and_choose(export_dir: Path, requested: Precision, checkpoint_dir: Path, pipeline: Any) -> PrecisionChoice:
    """Build `export_dir/int8/` from the fp32 export in `export_dir` (unless fp32 is forced),
    measure both on images, write `precision.json` and return the choice."""
    export_dir = Path(export_dir)
    fp32 = export_dir / ONNX_FILE
    int8: Path | None = None
    mad = psnr = latent_error = fp32_ms = int8_ms = None
    failure = None
    if requested != "fp32":
        started = time.monotonic()
        try:
            int8 = quantize_export(export_dir, export_dir / INT8_DIR)
            log.info("transformer int8 graph built in %.1fs", time.monotonic() - started)
            mad, psnr, latent_error, fp32_ms, int8_ms = image_parity(checkpoint_dir, pipeline, fp32, int8)
        except Exception as e:  # auto falls back to the fp32 export it already has
            if requested == "int8":
                raise
            log.warning("transformer int8 build or measurement failed, serving fp32: %s", e)
            failure = f"int8 build or measurement failed ({type(e).__name__}: {e})"
            shutil.rmtree(export_dir / INT8_DIR, ignore_errors=True)
            int8 = None
    served, reason = choose(requested, mad, psnr, fp32_ms, int8_ms, latent_error)
    reason = failure or reason
    if served == "fp32" and int8 is not None:
        shutil.rmtree(int8.parent)  # not served: nothing may patch or publish it
    choice = PrecisionChoice(
        served=served,
        reason=reason,
        requested=requested,
        images=len(PARITY_PROMPTS),
        image_size=PARITY_SIZE,
        steps=PARITY_STEPS,
        mean_abs_pixel_diff=mad,
        psnr_db=psnr,
        latent_relative_error=latent_error,
        fp32_transformer_ms_per_step=fp32_ms,
        int8_transformer_ms_per_step=int8_ms,
        bound={
            "max_mean_abs_pixel_diff": MAX_MEAN_ABS_PIXEL,
            "min_psnr_db": MIN_PSNR_DB,
            "max_latent_relative_error": MAX_LATENT_RELATIVE_ERROR,
        },
        fp32_bytes=_folder_bytes(fp32),
        int8_bytes=_folder_bytes(int8) if int8 is not None else None,
    )
    (export_dir / PRECISION_FILE).write_text(json.dumps(choice.as_dict(), indent=2))
    log.info("transformer precision: serving %s (%s)", served, reason)
    return choice
