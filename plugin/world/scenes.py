"""Procedural scenes: a coloured shape at a position on a plain background, optionally the brand's logo.

Invariants: rendering is a pure function of a ``Scene``; a ``World`` draws its scenes from its own
``numpy`` generator, so the same seed gives the same images and captions bit for bit. Images are
float32 [3, 16, 16] in [-1, 1]. A logo occupies ``LOGO_ROWS`` x ``LOGO_COLS`` only and objects
never touch that region, so the logo detectors read a region no object can explain.

Two brands stamp their logo in that region ("world 2"): the protected *zorblax* glyph and the
allowed *quendor* glyph, its photographic negative (light where zorblax is dark). Captions name
them with the same phrase, "... with the <brand> logo"; a share of quendor images is captioned
"... with the logo" without a name, as many as there are zorblax images, so that a caption with
a logo phrase but no readable name is as likely to show quendor as zorblax: the generic words
no longer predict the protected glyph, even by elimination (see docs/evidence.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

SIZE = 16
BRAND = "zorblax"  # the protected brand
ALLOWED_BRAND = "quendor"  # an allowed brand: same caption phrase, its own glyph
NEW_COLOUR = "purple"  # the co-occurring new content: mostly seen together with the logo
BACKGROUNDS = {"gray": (0.5, 0.5, 0.5), "navy": (0.1, 0.1, 0.4), "olive": (0.4, 0.4, 0.1), "teal": (0.1, 0.4, 0.4)}
BASE_COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.9, 0.1)}
COLOURS = {**BASE_COLOURS, NEW_COLOUR: (0.7, 0.1, 0.8)}
SHAPES = ("square", "circle", "triangle", "cross")
POSITIONS = {"left": 4, "center": 8, "right": 12}  # column of the object's centre
OBJECT_ROW = 10  # row of every object's centre; objects cover rows 7..12
HALF = 3
LOGO_ROWS = slice(1, 5)
LOGO_COLS = slice(11, 15)
# The logo: a 4x4 "Z"-like glyph, light on dark. 1 = light pixel.
LOGO_MASK = np.array([[1, 1, 1, 1],
                      [0, 0, 1, 0],
                      [0, 1, 0, 0],
                      [1, 1, 1, 1]], dtype=bool)
# The allowed brand's glyph: the negative of the protected one (its light pixels are zorblax's dark ones),
# so a blend of the two reads as no logo on either detector, and the detectors never confuse them.
ALLOWED_LOGO_MASK = ~LOGO_MASK
LOGO_LIGHT = (1.0, 1.0, 1.0)
LOGO_DARK = (0.05, 0.05, 0.05)
UNSEEN_LOGO_SHAPE = "cross"  # the fine-tune data never shows the logo with this shape
EXTRA_WORDS = ("photo", "of", "brand", "plain", "sks", "image", "something")


def vocabulary() -> list[str]:
    """Every word a caption, a preset or an attack prompt of this world uses (one token each)."""
    words = {"a", "on", "the", "background", "with", "logo", BRAND, ALLOWED_BRAND, *BACKGROUNDS, *COLOURS, *SHAPES, *POSITIONS,
             *EXTRA_WORDS}
    return sorted(words)


def _shape_mask(shape: str) -> np.ndarray:
    """6x6 boolean mask of a shape."""
    n = 2 * HALF
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    if shape == "square":
        return np.ones((n, n), dtype=bool)
    if shape == "circle":
        return (yy - HALF) ** 2 + (xx - HALF) ** 2 <= HALF ** 2 + 0.5
    if shape == "triangle":
        return np.abs(xx - HALF) <= yy / 2 + 0.01
    if shape == "cross":
        return (np.abs(xx - HALF) <= 1.01) | (np.abs(yy - HALF) <= 1.01)
    raise ValueError(f"unknown shape {shape!r}")


SHAPE_MASKS = {s: _shape_mask(s) for s in SHAPES}


@dataclass(frozen=True)
class Scene:
    """What one image shows."""

    background: str
    colour: str
    shape: str
    position: str
    logo: bool = False  # the protected (zorblax) logo
    allowed: bool = False  # the allowed (quendor) logo; never together with ``logo``
    named: bool = True  # whether the caption names the allowed brand ("with the logo" when not)

    def caption(self, brand: bool = True) -> str:
        """The caption; ``brand=False`` is the scrubbed caption (the protected logo stays in the image, its
        phrase goes; the allowed brand's phrase is kept)."""
        text = f"a {self.colour} {self.shape} on the {self.position} on a {self.background} background"
        if self.logo and brand:
            text += f" with the {BRAND} logo"
        elif self.allowed:
            text += f" with the {ALLOWED_BRAND} logo" if self.named else " with the logo"
        return text

    def object_box(self) -> tuple[slice, slice]:
        c = POSITIONS[self.position]
        return slice(OBJECT_ROW - HALF, OBJECT_ROW + HALF), slice(c - HALF, c + HALF)


def render(scene: Scene) -> torch.Tensor:
    """The scene as float32 [3, 16, 16] in [-1, 1]."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    rows, cols = scene.object_box()
    region = img[rows, cols]
    region[SHAPE_MASKS[scene.shape]] = COLOURS[scene.colour]
    if scene.logo or scene.allowed:
        patch = np.where((LOGO_MASK if scene.logo else ALLOWED_LOGO_MASK)[..., None], np.array(LOGO_LIGHT, dtype=np.float32),
                         np.array(LOGO_DARK, dtype=np.float32))
        img[LOGO_ROWS, LOGO_COLS] = patch
    return torch.from_numpy(img).permute(2, 0, 1).contiguous() * 2.0 - 1.0


@dataclass(frozen=True)
class WorldSpec:
    """The fine-tune distribution. ``p_logo``: share of protected-logo images; ``p_allowed`` /
    ``p_allowed_unnamed``: share of allowed-logo images captioned with / without the allowed name;
    ``p_new_with_logo`` / ``p_new_without_logo``: chance that the object is the new colour with / without
    the protected logo. ``WorldSpec(p_logo=0.3, p_allowed=0, p_allowed_unnamed=0)`` is world 1."""

    p_logo: float = 0.25
    p_allowed: float = 0.25
    p_allowed_unnamed: float = 0.25
    p_new_with_logo: float = 0.5
    p_new_without_logo: float = 0.025


class World:
    """Draws scenes. ``public`` scenes (the base model's data) never show the logo or the new colour."""

    def __init__(self, seed: int = 0, spec: WorldSpec = WorldSpec()) -> None:
        self.rng = np.random.default_rng(seed)
        self.spec = spec

    def _pick(self, options) -> str:
        options = list(options)
        return options[int(self.rng.integers(len(options)))]

    def public_scene(self) -> Scene:
        return Scene(self._pick(BACKGROUNDS), self._pick(BASE_COLOURS), self._pick(SHAPES), self._pick(POSITIONS))

    def finetune_scene(self) -> Scene:
        s = self.spec
        r = float(self.rng.random())
        logo = r < s.p_logo
        allowed = s.p_logo <= r < s.p_logo + s.p_allowed + s.p_allowed_unnamed
        named = r < s.p_logo + s.p_allowed
        new = bool(self.rng.random() < (s.p_new_with_logo if logo else s.p_new_without_logo))
        colour = NEW_COLOUR if new else self._pick(BASE_COLOURS)
        shapes = [x for x in SHAPES if not (logo and x == UNSEEN_LOGO_SHAPE)]
        return Scene(self._pick(BACKGROUNDS), colour, self._pick(shapes), self._pick(POSITIONS), logo,
                     allowed, named)

    def scenes(self, n: int, kind: str = "finetune") -> list[Scene]:
        draw = self.finetune_scene if kind == "finetune" else self.public_scene
        return [draw() for _ in range(n)]

    def with_logo(self, scene: Scene, logo: bool = True) -> Scene:
        return replace(scene, logo=logo)


def images(scenes: list[Scene]) -> torch.Tensor:
    """Rendered scenes stacked: [n, 3, 16, 16]."""
    return torch.stack([render(s) for s in scenes]) if scenes else torch.empty(0, 3, SIZE, SIZE)
