"""How close a generated image must stay to its reference to count as the same model: the bounds
the CPU transformer's int8 choice (export.flux.transformer_precision) and the GPU benchmark's
precision check (benchmarks/gpu.py: fp8 and compiled configs against bfloat16) both apply. Plain
numbers, in a module of their own so the gpu-torch path need not import onnx.
"""

MAX_MEAN_ABS_PIXEL = 1.0
"""int8 may move a generated image's pixels (0..255) by at most 1 on average..."""
MIN_PSNR_DB = 40.0
"""...and no image may fall under 40 dB PSNR against fp32's. The bound lies between what the int8
transformer and an int8 VAE decoder were seen to do, so it separates visible from invisible
(docs/decisions/int8-flux-transformer.md)."""
MAX_LATENT_RELATIVE_ERROR = 0.05
"""...and the latents entering the VAE decoder may differ from fp32's by at most 5% (relative L2).
The image bounds alone cannot see a bad transformer on the small local model: its random-weight
VAE decodes nearly every latent to the same grey. The bound leaves int8 on the local models
ample room (docs/benchmarks.md, "Generation")."""
