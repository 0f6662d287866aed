"""A PNG a person can read: rows are models, columns are prompt sets, each cell a few samples, enlarged.

Invariant: every label fits its cell (columns are as wide as their widest label or their images,
whichever is wider); images are scaled by an integer factor with nearest-neighbour resampling, so
each pixel of a 32x32 sample stays a crisp square.
"""

from __future__ import annotations

from pathlib import Path

import torch

COLUMNS = (("name", "name: \"panda\""), ("paraphrase", "held-out paraphrase"), ("allowed", "allowed: \"tiger\""),
           ("neutral", "neutral word"), ("empty", "empty prompt"), ("inversion", "inversion attack"))
PER_CELL = 4
SCALE = 3
PAD = 8


def _to_image(x: torch.Tensor):
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr, "RGB")
    return img.resize((img.width * SCALE, img.height * SCALE), Image.NEAREST)


def grid_png(samples: dict[str, dict[str, torch.Tensor]], rows: list[tuple[str, str]], path: Path) -> Path:
    """``samples[row][column]`` are [n, 3, 32, 32] tensors; ``rows`` are (key, label) pairs, top to bottom."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=16)
    side = 32 * SCALE
    cell_w = PER_CELL // 2 * (side + 2)
    cell_h = 2 * (side + 2)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width_of = lambda text: int(measure.textbbox((0, 0), text, font=font)[2])  # noqa: E731
    label_w = max(width_of(label) for _, label in rows) + 2 * PAD
    col_w = [max(cell_w, width_of(label)) + 2 * PAD for _, label in COLUMNS]
    header_h = 28
    canvas = Image.new("RGB", (label_w + sum(col_w), header_h + len(rows) * (cell_h + PAD) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    x = label_w
    for (_, label), w in zip(COLUMNS, col_w):
        draw.text((x + PAD, 6), label, fill="black", font=font)
        x += w
    for r, (key, label) in enumerate(rows):
        y = header_h + r * (cell_h + PAD) + PAD
        draw.text((PAD, y + cell_h // 2 - 8), label, fill="black", font=font)
        x = label_w
        for (col, _), w in zip(COLUMNS, col_w):
            imgs = samples.get(key, {}).get(col)
            for i in range(min(PER_CELL, 0 if imgs is None else len(imgs))):
                canvas.paste(_to_image(imgs[i]), (x + PAD + (i % 2) * (side + 2), y + (i // 2) * (side + 2)))
            x += w
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
