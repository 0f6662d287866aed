"""What many tests share: the tiny vocabulary, a preset builder, captioned image folders, and reading a command's
stderr as a user does. Fixtures stay in conftest.py; model builders are in ``helpers.models``, MMDiT ones in
``helpers.mmdit``."""

from __future__ import annotations

import re

from concept_exclusion import parse_preset

WORDS = ("a photo of the zorblax logo brand shirt with sign showing on red blue green background in scene image "
         "picture something thing cat dog tree house car circle square").split()

PRESET = """
[preset]
name = "test-logo"
version = "1"
description = "test preset"

[[concepts]]
name = "zorblax"
prompts = ["zorblax", "zorblax logo"]
templates = ["{}", "a photo of {}", "a shirt with the {}"]
neutral = "brand"

[projection]
max_rank = {max_rank}
tokens = "{tokens}"
targets = {targets}
mode = "{mode}"
"""


def make_preset(tokens: str = "all", targets: str = '["kv"]', mode: str = "exact", max_rank: int = 128):
    text = PRESET.replace("{tokens}", tokens).replace("{targets}", targets).replace("{mode}", mode)
    return parse_preset(text.replace("{max_rank}", str(max_rank)), source="test-preset.toml")


def write_captioned_images(folder, captions, size=lambda i: (32, 32), name=lambda i: f"{i}"):
    """A kohya-style dataset: random RGB images with same-name ``.txt`` captions, seeded. Returns ``folder``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(captions):
        h, w = size(i)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name(i)}.png")
        (folder / f"{name(i)}.txt").write_text(caption)
    return folder


_PROGRESS = re.compile(r"^[^|]*\|[^|]*\|.*(it/s|s/it)\]?\s*$")
_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # nested bars move the cursor between redraws


def message_lines(stderr: str) -> list[str]:
    """stderr without progress-bar redraws (model loading bars): the lines a user reads as messages."""
    pieces = [_CURSOR.sub("", p).strip() for p in re.split(r"[\r\n]+", stderr)]
    return [p for p in pieces if p and not _PROGRESS.match(p)]
