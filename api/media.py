"""Image bytes as a client gets them: the encodings /generate offers and the media type of each."""

from __future__ import annotations

import io
from typing import get_args

import numpy as np
from PIL import Image

from contract.specs import OutputFormat

MEDIA_TYPES: dict[str, str] = {fmt: f"image/{fmt}" for fmt in get_args(OutputFormat)}


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """`pixels` (H, W, 3 uint8) as `fmt` file bytes. Tens of ms of CPU for a large image: callers
    run it off the event loop."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt.upper(), **({"quality": 95} if fmt != "png" else {}))
    return buf.getvalue()


def raw_format(accept: str) -> str | None:
    """The image format a client asked for by Accept header, if it asked for raw bytes."""
    for fmt, media in MEDIA_TYPES.items():
        if media in accept:
            return fmt
    return None
