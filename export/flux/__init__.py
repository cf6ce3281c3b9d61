"""FLUX.1-dev (+ LoRA) build and export: a local random-weight checkpoint, LoRA fusing, ONNX.

Modules:
- `settings`: where the base model and LoRA come from (local default or the real hub ids).
- `checkpoint`: `build_local_flux`, an offline random-weight FLUX pipeline in Hugging Face layout.
- `lora`: `build_local_lora` (same key format as the real LoRA) and `load_pipeline` (load + fuse).
- `onnx_export`: one ONNX file per component, each checked against PyTorch.

The denoising loop that drives the exported components lives in `serving.flux_loop`.
"""
