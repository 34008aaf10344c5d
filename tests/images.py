"""Images for tests: small PNG and JPEG files made with Pillow, as bytes or data URLs."""

from __future__ import annotations

import base64
import io

import numpy as np


def image_bytes(
    width: int = 40, height: int = 30, fmt: str = "PNG", *, noise: bool = False
) -> bytes:
    """An RGB image; ``noise`` makes it incompressible (a PNG of about 3 bytes a pixel)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    if noise:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[..., 0] = 200
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = "what is this?") -> dict:
    """A user message with a text part and an image part (content.1 is the image)."""
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": url}},
        ],
    }
