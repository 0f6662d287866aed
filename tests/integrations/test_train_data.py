"""``train`` data: every image and caption checked before step 1, one line naming a bad file, images that claim
huge sizes refused from their header, 16-bit images read in their own range."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from concept_exclusion.integrations.train.data import load_image, scan_dataset
from concept_exclusion.errors import ConceptExclusionError

from helpers import write_captioned_images


def _png_claiming(path, width: int, height: int) -> None:
    """A PNG whose IHDR claims ``width`` x ``height`` (its pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def _refused(folder, needle: str) -> str:
    with pytest.raises(ConceptExclusionError) as info:
        scan_dataset(folder)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    return message


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    folder = write_captioned_images(tmp_path / "data", ["a cat", "a dog"])
    _png_claiming(folder / "2.png", 30000, 30000)
    (folder / "2.txt").write_text("a bomb")
    assert "2.png" in _refused(folder, "image is too large")
    _png_claiming(folder / "2.png", 9000, 9000)  # under PIL's own limit, over ours
    assert "9000x9000" in _refused(folder, "at most")


def test_a_caption_that_is_not_utf8_is_named(tmp_path):
    folder = write_captioned_images(tmp_path / "data", ["a cat", "a dog"])
    (folder / "1.txt").write_bytes(b"caf\xe9 latin-1")
    assert "1.txt" in _refused(folder, "not UTF-8")


def test_a_truncated_image_is_found_before_training(tmp_path):
    folder = write_captioned_images(tmp_path / "data", ["a", "b", "c", "d", "e"], size=lambda i: (64, 64))
    data = (folder / "3.png").read_bytes()
    (folder / "3.png").write_bytes(data[: len(data) // 2])
    assert "3.png" in _refused(folder, "cannot read image")


def test_sixteen_bit_images_keep_their_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = load_image(path, 32)
    assert pixels.shape == (3, 32, 32)
    saturated = float((pixels >= 0.999).float().mean())
    assert saturated < 0.05 and float(pixels.min()) < -0.9 and float(pixels.max()) > 0.9
    # the same picture at 8 bits reads alike
    Image.fromarray((ramp // 257).astype(np.uint8)).convert("RGB").save(tmp_path / "flat.png")
    assert float((load_image(tmp_path / "flat.png", 32) - pixels).abs().max()) < 0.05


def test_good_folders_still_scan(tmp_path):
    folder = write_captioned_images(tmp_path / "data", ["a cat", "\ufeffa dog with a BOM"])
    examples = scan_dataset(folder)
    assert [e.caption for e in examples] == ["a cat", "a dog with a BOM"]
