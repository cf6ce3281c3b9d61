"""How close a generated image must stay to its reference to count as the same model: the bounds
the CPU transformer's int8 choice (export.flux.transformer_precision) and the GPU benchmark's
precision check (benchmarks/gpu.py: fp8 and compiled configs against bfloat16) both apply. Plain
numbers, in a module of their own so the gpu-torch path need not import onnx.
"""

MAX_MEAN_ABS_PIXEL = 1.0
"""int8 may move a generated image's pixels (0..255) by at most 1 on average..."""
MIN_PSNR_DB = 40.0
"""...and no image may fall under 40 dB PSNR against fp32's. Measured: int8 transformer 0.20 /
55 dB; an int8 VAE decoder 1.47 / 42.5 dB (so the bound does separate visible from invisible)."""
MAX_LATENT_RELATIVE_ERROR = 0.05
"""...and the latents entering the VAE decoder may differ from fp32's by at most 5% (relative L2).
The image bounds alone cannot see a bad transformer on the small local model: its random-weight
VAE decodes nearly every latent to the same grey. Measured: 0.45-0.47% for int8 on the small
model (0.43-0.44% on the tests' tiny one); the bound leaves 10x that."""
