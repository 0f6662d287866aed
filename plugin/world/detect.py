"""Exact detectors of this world: the logo (pattern contrast in its known region), an object's colour and shape.

The logo score is the mean luminance of the glyph's light pixels minus that of its dark pixels
inside the logo region (about 0.95 for a rendered logo, 0 for any clean image). Its threshold
is calibrated on rendered images with and without the logo, with pixel noise added so that the
threshold sits in the middle of the gap a sampled image can fall into.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .scenes import (BACKGROUNDS, COLOURS, LOGO_COLS, LOGO_MASK, LOGO_ROWS, SHAPE_MASKS, Scene, World, images)

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
_MASK = torch.from_numpy(LOGO_MASK)


def logo_scores(x: torch.Tensor) -> torch.Tensor:
    """Per image [n, 3, 16, 16] in [-1, 1]: light-minus-dark luminance contrast of the glyph, in [-1, 1]."""
    luma = ((x.float().clamp(-1, 1) + 1) / 2 * _LUMA).sum(1)[:, LOGO_ROWS, LOGO_COLS]
    return luma[:, _MASK].mean(1) - luma[:, ~_MASK].mean(1)


@dataclass(frozen=True)
class Calibration:
    threshold: float
    precision: float
    recall: float
    n: int
    noise: float


def calibrate(seed: int = 123, n: int = 400, noise: float = 0.15) -> Calibration:
    """Threshold halfway between the 99th percentile of clean scores and the 1st of logo scores
    (images with Gaussian pixel noise of std ``noise``), then precision/recall on a fresh draw."""
    def draw(world: World, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        scenes = world.scenes(count, "finetune")
        labels = torch.tensor([s.logo for s in scenes])
        gen = torch.Generator().manual_seed(int(world.rng.integers(1 << 30)))
        x = images(scenes)
        return x + noise * torch.randn(x.shape, generator=gen), labels

    world = World(seed)
    x, y = draw(world, n)
    s = logo_scores(x)
    lo = float(torch.quantile(s[~y], 0.99))
    hi = float(torch.quantile(s[y], 0.01))
    threshold = (lo + hi) / 2
    x2, y2 = draw(world, n)
    pred = logo_scores(x2) > threshold
    tp = int((pred & y2).sum())
    precision = tp / max(int(pred.sum()), 1)
    recall = tp / max(int(y2.sum()), 1)
    return Calibration(threshold, precision, recall, n, noise)


def _nearest(value: np.ndarray, table: dict[str, tuple]) -> str:
    names = list(table)
    dist = [float(np.square(value - np.array(table[k])).sum()) for k in names]
    return names[int(np.argmin(dist))]


def read_object(x: torch.Tensor, scene: Scene) -> tuple[str, str]:
    """(colour, shape) that image ``x`` shows where ``scene`` puts its object.

    Colour: the nearest palette colour to the mean of the box's pixels that differ most from the
    scene's background. Shape: the shape mask with the highest IoU with those pixels.
    """
    img = ((x.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    rows, cols = scene.object_box()
    box = img[rows, cols]
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    diff = np.sqrt(np.square(box - bg).sum(-1))
    fg = diff > 0.25
    if not fg.any():
        return "none", "none"
    colour = _nearest(box[fg].mean(0), COLOURS)
    ious = {k: (fg & m).sum() / max((fg | m).sum(), 1) for k, m in SHAPE_MASKS.items()}
    shape = max(ious, key=ious.get)
    return colour, shape


def fidelity(x: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Share of samples whose colour, shape, and both, match the prompted scene."""
    colour = shape = both = 0
    for img, scene in zip(x, scenes):
        c, s = read_object(img, scene)
        colour += c == scene.colour
        shape += s == scene.shape
        both += (c == scene.colour) and (s == scene.shape)
    n = max(len(scenes), 1)
    return {"colour": colour / n, "shape": shape / n, "both": both / n}
