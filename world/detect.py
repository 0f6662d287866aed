"""Exact detectors of world 3: which emblem an image shows, and the colour, shape and position of its object.

Emblem: an 8x8 slot (the logo's two, the badge's top-left corner), each colour channel centred on
its mean, is correlated with each emblem's centred pattern; the slot shows emblem k when it has a
pattern at all (RMS contrast at least ``MIN_CONTRAST``, colour units in [0, 1]) and k's correlation
is the largest and at least ``MIN_CORRELATION``. Every pattern is tried in every slot, so a tiger
drawn in the logo's corner is read as a tiger, not as no logo; an image shows an emblem when any of its slots does. A sampled emblem is blurred: a
sampled panda correlates with the panda's pattern about 0.6 (the others' below 0.15), with RMS
contrast 0.13-0.14 against the rendered emblem's 0.39, while a blank corner has 0.002-0.006; no
sample sits near ``MIN_CONTRAST``, so a rate counts decisions, not faint traces. Object: the
background colour is read from the rows between the emblems and the objects (nothing else
reaches them); object pixels are those in the object band
farther than ``OBJECT_DISTANCE`` from it; the colour is the nearest palette colour of their mean, and
the shape and position are those whose mask has the largest intersection-over-union with them.
"""

from __future__ import annotations

import numpy as np
import torch

from .scenes import (BACKGROUND_ROWS, COLOURS, EMBLEM_ROWS, EMBLEMS, HALF, LOGO_SLOTS, OBJECT_ROW, POSITIONS,
                     SHAPE_MASKS, SIZE, emblem_slots)

MIN_CONTRAST = 0.06
MIN_CORRELATION = 0.4
OBJECT_DISTANCE = 0.25
_BAND = slice(OBJECT_ROW - HALF, OBJECT_ROW + HALF)


def _centred(region: torch.Tensor) -> torch.Tensor:
    return region - region.mean(dim=(-2, -1), keepdim=True)


_NAMES = list(EMBLEMS)
_PATTERNS = torch.stack([_centred(torch.from_numpy(g).permute(2, 0, 1)) for g in EMBLEMS.values()]).flatten(1)
_PATTERNS = _PATTERNS / _PATTERNS.norm(dim=1, keepdim=True)


def emblem_correlations(x: torch.Tensor, cols: slice = LOGO_SLOTS["corner"]) -> tuple[torch.Tensor, torch.Tensor]:
    """(correlation with each emblem's pattern [n, emblems], RMS contrast [n]) of the corner ``cols``."""
    z = _centred(((x.float().clamp(-1, 1) + 1) / 2)[:, :, EMBLEM_ROWS, cols]).flatten(1)
    norm = z.norm(dim=1)
    return (z @ _PATTERNS.T) / norm.clamp_min(1e-8)[:, None], norm / z.shape[1] ** 0.5


def emblems(x: torch.Tensor, cols: slice = LOGO_SLOTS["corner"]) -> list[str | None]:
    """Per image [n, 3, 32, 32] in [-1, 1]: the emblem its slot ``cols`` shows (a key of ``EMBLEMS``) or None;
    the logo's corner by default, ``BADGE_COLS`` for the badge."""
    corr, contrast = emblem_correlations(x, cols)
    best = corr.argmax(dim=1)
    return [_NAMES[k] if float(contrast[i]) >= MIN_CONTRAST and float(corr[i, k]) >= MIN_CORRELATION else None
            for i, k in enumerate(best.tolist())]


def emblem_rate(x: torch.Tensor, emblem: str) -> float:
    """Share of images that show ``emblem`` in any of its own slots."""
    if not len(x):
        return 0.0
    shown = [any(found) for found in zip(*[[e == emblem for e in emblems(x, cols)] for cols in emblem_slots(emblem)])]
    return sum(shown) / len(shown)


def _masks() -> tuple[list[tuple[str, str]], np.ndarray]:
    keys, masks = [], []
    for shape, m in SHAPE_MASKS.items():
        for pos, c in POSITIONS.items():
            full = np.zeros((2 * HALF, SIZE), dtype=bool)
            full[:, c - HALF:c + HALF] = m
            keys.append((shape, pos))
            masks.append(full)
    return keys, np.stack(masks)


_SHAPE_KEYS, _SHAPE_MASKS = _masks()
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)


def objects(x: torch.Tensor) -> list[tuple[str, str, str] | None]:
    """Per image: (colour, shape, position) of its object, or None when no object is visible."""
    img = ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    out = []
    for im in img:
        bg = np.median(im[BACKGROUND_ROWS].reshape(-1, 3), axis=0)
        band = im[_BAND]
        on = np.linalg.norm(band - bg, axis=-1) > OBJECT_DISTANCE
        if on.sum() < 12:
            out.append(None)
            continue
        colour = _PALETTE_NAMES[int(np.linalg.norm(_PALETTE - band[on].mean(0), axis=-1).argmin())]
        inter = (_SHAPE_MASKS & on).sum(axis=(1, 2))
        union = (_SHAPE_MASKS | on).sum(axis=(1, 2))
        shape, pos = _SHAPE_KEYS[int((inter / union).argmax())]
        out.append((colour, shape, pos))
    return out
