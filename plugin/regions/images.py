"""Decoding images for the regions: Pillow only (PNG, JPEG, WebP, BMP), never unpickled, bounded in size."""

from __future__ import annotations

import io

import torch

from concept_exclusion.errors import ConceptExclusionError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
MAX_SIDE = 8192


def decode_image(data: bytes, where: str, error: type[ConceptExclusionError], max_side: int = MAX_SIDE
                 ) -> torch.Tensor:
    """``data`` as an RGB image: float32 [3, h, w] in [-1, 1]; ``error(where: problem)`` when it is not one of
    ``IMAGE_FORMATS`` or is larger than ``max_side`` on a side."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as im:
            if max(im.size) > max_side:
                raise error(f"{where}: {im.size[0]}x{im.size[1]} pixels; at most {max_side} on a side")
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise error(f"{where}: not a readable {'/'.join(IMAGE_FORMATS)} image ({exc})") from None
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(rgb.size[1], rgb.size[0], 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0
