"""Exact detectors of this world: the logo (pattern contrast in its known region), an object's colour and shape.

The logo score is the mean luminance of the glyph's light pixels minus that of its dark pixels
inside the logo region (about 0.95 for a rendered logo, 0 for any clean image). The allowed
brand's glyph is the negative of the protected one, so its score is the protected score's
negative (about 0.95 on an allowed logo, about -0.95 on a protected one). Each threshold is
calibrated on rendered fine-tune images (clean, protected logo, allowed logo), with pixel noise
added so that the threshold sits in the middle of the gap a sampled image can fall into.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .scenes import (ALLOWED_LOGO_MASK, BACKGROUNDS, COLOURS, LOGO_COLS, LOGO_MASK, LOGO_ROWS, SHAPE_MASKS, Scene, World, images)

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
_MASK = torch.from_numpy(LOGO_MASK)
_ALLOWED = torch.from_numpy(ALLOWED_LOGO_MASK)


def logo_scores(x: torch.Tensor) -> torch.Tensor:
    """Per image [n, 3, 16, 16] in [-1, 1]: light-minus-dark luminance contrast of the protected glyph, in [-1, 1]."""
    luma = ((x.float().clamp(-1, 1) + 1) / 2 * _LUMA).sum(1)[:, LOGO_ROWS, LOGO_COLS]
    return luma[:, _MASK].mean(1) - luma[:, ~_MASK].mean(1)


def allowed_scores(x: torch.Tensor) -> torch.Tensor:
    """Per image: light-minus-dark contrast of the allowed glyph (the negative of the protected one)."""
    luma = ((x.float().clamp(-1, 1) + 1) / 2 * _LUMA).sum(1)[:, LOGO_ROWS, LOGO_COLS]
    return luma[:, _ALLOWED].mean(1) - luma[:, ~_ALLOWED].mean(1)


@dataclass(frozen=True)
class Calibration:
    """Thresholds and precision/recall (fresh draw) of the protected and the allowed logo detectors."""

    threshold: float
    precision: float
    recall: float
    n: int
    noise: float
    allowed_threshold: float = float("nan")
    allowed_precision: float = float("nan")
    allowed_recall: float = float("nan")


def calibrate(seed: int = 123, n: int = 400, noise: float = 0.15) -> Calibration:
    """Per detector: threshold halfway between the 99th percentile of the scores of images without its logo
    (clean or the other brand's) and the 1st percentile of those with it (images with Gaussian pixel noise
    of std ``noise``), then precision/recall on a fresh draw."""
    def draw(world: World, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scenes = world.scenes(count, "finetune")
        gen = torch.Generator().manual_seed(int(world.rng.integers(1 << 30)))
        x = images(scenes)
        return (x + noise * torch.randn(x.shape, generator=gen), torch.tensor([s.logo for s in scenes]),
                torch.tensor([s.allowed and not s.logo for s in scenes]))

    world = World(seed)
    x, y, ya = draw(world, n)
    x2, y2, ya2 = draw(world, n)
    out = []
    for score, labels, labels2 in ((logo_scores, y, y2), (allowed_scores, ya, ya2)):
        s = score(x)
        if not bool(labels.any()):
            out += [float("nan")] * 3
            continue
        threshold = (float(torch.quantile(s[~labels], 0.99)) + float(torch.quantile(s[labels], 0.01))) / 2
        pred = score(x2) > threshold
        tp = int((pred & labels2).sum())
        out += [threshold, tp / max(int(pred.sum()), 1), tp / max(int(labels2.sum()), 1)]
    return Calibration(out[0], out[1], out[2], n, noise, out[3], out[4], out[5])


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
