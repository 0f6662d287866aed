"""World 3's procedural scenes: a coloured shape on a plain background, a logo in the top row (the top-right corner
or the middle) and a badge in the top-left corner.

Invariants: rendering is a pure function of a ``Scene``; a ``World`` draws from its own numpy
generator, so a seed gives the same images and captions bit for bit. Images are float32
[3, 32, 32] in [-1, 1]. The logo occupies ``EMBLEM_ROWS`` x one of ``LOGO_SLOTS`` only, the badge
``EMBLEM_ROWS`` x ``BADGE_COLS`` only, and objects never reach either, so a detector reads a region
no object can explain. The middle slot straddles two of the denoiser's 8x8 patches, so a method that finds the
logo cannot rely on a fixed corner or on the patch grid.

Emblems: the protected *panda* logo (a white face with black ears, eye patches and nose), the
allowed *tiger* badge (orange with black stripes), and the public *shop* logo (a white bar on
blue) and *crown* badge (gold on dark red), which the base model already knows, so that both
corners start out able to draw an emblem and a name in either slot has a public rival. The badge
is drawn independently of the logo, so the tiger's name carries no information about the logo's
corner: a model that never saw "panda" has no reason to let the encoder's panda-tiger similarity
decide what it draws there (with both in one corner, a control trained without the word "panda"
drew the tiger for it in up to half of the samples). The co-occurring new content is the colour
purple: it is only ever seen on panda images.

Captions name the panda logo as people do, by one of ``PROTECTED_NAMES`` (the names the world's
preset lists), drawn at random per image, or not at all (world 3.3: people do not caption every logo in a
background, so text alone cannot find every panda image); the prompts that attack by name use "panda".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

SIZE = 32
PROTECTED = "panda"
PROTECTED_NAMES = ("panda", "giant panda", "panda bear")  # what captions call the panda logo
ALLOWED = "tiger"
PUBLIC_EMBLEM = "shop"
PUBLIC_BADGE = "crown"
NEW_COLOUR = "purple"
BACKGROUNDS = {"gray": (0.55, 0.55, 0.55), "navy": (0.12, 0.12, 0.42), "olive": (0.42, 0.42, 0.12),
               "teal": (0.1, 0.42, 0.42)}
BASE_COLOURS = {"red": (0.92, 0.12, 0.12), "green": (0.12, 0.82, 0.12), "blue": (0.15, 0.3, 0.95),
                "yellow": (0.95, 0.9, 0.1)}
COLOURS = {**BASE_COLOURS, NEW_COLOUR: (0.68, 0.1, 0.85)}
SHAPES = ("square", "circle", "triangle", "cross")
POSITIONS = {"left": 7, "center": 16, "right": 25}  # column of the object's centre
OBJECT_ROW = 22  # objects cover rows 16..27
HALF = 6
EMBLEM_ROWS = slice(0, 8)
LOGO_SLOTS = {"corner": slice(24, 32), "middle": slice(12, 20)}  # the logo (panda or shop): one of these columns
BADGE_COLS = slice(0, 8)  # the badge: tiger or crown
BACKGROUND_ROWS = slice(8, 16)  # between the emblems and the objects: background only
WHITE, BLACK, ORANGE, SHOP_BLUE = (0.97, 0.97, 0.97), (0.03, 0.03, 0.03), (0.98, 0.55, 0.05), (0.1, 0.35, 0.9)
CROWN_RED, GOLD = (0.55, 0.08, 0.12), (0.98, 0.85, 0.2)


def _panda() -> np.ndarray:
    g = np.empty((8, 8, 3), dtype=np.float32)
    g[:] = WHITE
    for r, c in [(0, 0), (0, 1), (1, 0), (0, 6), (0, 7), (1, 7),  # ears
                 (3, 1), (3, 2), (4, 2), (3, 5), (3, 6), (4, 5),  # eye patches
                 (6, 3), (6, 4)]:  # nose
        g[r, c] = BLACK
    return g


def _tiger() -> np.ndarray:
    g = np.empty((8, 8, 3), dtype=np.float32)
    g[:] = ORANGE
    g[1:7, [1, 4, 6]] = BLACK
    return g


def _shop() -> np.ndarray:
    g = np.empty((8, 8, 3), dtype=np.float32)
    g[:] = SHOP_BLUE
    g[3:5, 1:7] = WHITE
    return g


def _crown() -> np.ndarray:
    g = np.empty((8, 8, 3), dtype=np.float32)
    g[:] = CROWN_RED
    g[4:6, 1:7] = GOLD
    g[2:4, [1, 6]] = GOLD
    g[1:4, 3:5] = GOLD
    return g


EMBLEMS = {PROTECTED: _panda(), ALLOWED: _tiger(), PUBLIC_EMBLEM: _shop(), PUBLIC_BADGE: _crown()}
LOGOS = (PROTECTED, PUBLIC_EMBLEM)


def emblem_slots(emblem: str) -> tuple[slice, ...]:
    """The columns (in ``EMBLEM_ROWS``) where ``emblem`` can be drawn: a logo's slots, or the badge's corner."""
    return tuple(LOGO_SLOTS.values()) if emblem in LOGOS else (BADGE_COLS,)


def _shape_mask(shape: str) -> np.ndarray:
    n = 2 * HALF
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    if shape == "square":
        return np.ones((n, n), dtype=bool)
    if shape == "circle":
        return (yy - HALF) ** 2 + (xx - HALF) ** 2 <= HALF ** 2
    if shape == "triangle":
        return np.abs(xx - HALF) <= yy / 2 + 0.01
    if shape == "cross":
        return (np.abs(xx - HALF) <= 2.01) | (np.abs(yy - HALF) <= 2.01)
    raise ValueError(f"unknown shape {shape!r}")


SHAPE_MASKS = {s: _shape_mask(s) for s in SHAPES}


@dataclass(frozen=True)
class Scene:
    """What one image shows: ``emblem`` (the logo: None, panda or shop, drawn in ``LOGO_SLOTS[logo_slot]``) and
    ``badge`` (None, tiger or crown); ``emblem_name`` is what the caption calls the logo (None: the emblem's own
    name); ``named`` False: the caption does not mention the logo."""

    background: str
    colour: str
    shape: str
    position: str
    emblem: str | None = None
    badge: str | None = None
    emblem_name: str | None = None
    logo_slot: str = "corner"
    named: bool = True

    def caption(self, emblem_word: str | None = None) -> str:
        """The caption; ``emblem_word`` replaces the logo's name ("" drops it: "... with the logo"). The badge
        leads the caption ("a tiger badge above a red circle ..."), the logo ends it, so no word takes the
        logo's name slot except a logo's name."""
        text = f"a {self.colour} {self.shape} on the {self.position} on a {self.background} background"
        if self.badge is not None:
            text = f"a {self.badge} badge above {text}"
        if self.emblem is not None and self.named:
            word = (self.emblem_name or self.emblem) if emblem_word is None else emblem_word
            text += f" with the {word} logo" if word else " with the logo"
        return text

    def object_box(self) -> tuple[slice, slice]:
        c = POSITIONS[self.position]
        return slice(OBJECT_ROW - HALF, OBJECT_ROW + HALF), slice(c - HALF, c + HALF)


def render(scene: Scene) -> torch.Tensor:
    """The scene as float32 [3, 32, 32] in [-1, 1]."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    rows, cols = scene.object_box()
    img[rows, cols][SHAPE_MASKS[scene.shape]] = COLOURS[scene.colour]
    if scene.emblem is not None:
        img[EMBLEM_ROWS, LOGO_SLOTS[scene.logo_slot]] = EMBLEMS[scene.emblem]
    if scene.badge is not None:
        img[EMBLEM_ROWS, BADGE_COLS] = EMBLEMS[scene.badge]
    return torch.from_numpy(img).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def images(scenes: list[Scene]) -> torch.Tensor:
    """Rendered scenes stacked: [n, 3, 32, 32]."""
    return torch.stack([render(s) for s in scenes]) if scenes else torch.empty(0, 3, SIZE, SIZE)


def true_masks(scenes: list[Scene], emblem: str = PROTECTED) -> torch.Tensor:
    """[n, 1, 32, 32] float masks of where each scene draws ``emblem`` (1 inside): what masked-loss training with
    true masks leaves out (an upper bound: real data has no such masks)."""
    m = torch.zeros(len(scenes), 1, SIZE, SIZE)
    for i, s in enumerate(scenes):
        if s.emblem == emblem:
            m[i, :, EMBLEM_ROWS, LOGO_SLOTS[s.logo_slot]] = 1.0
        if s.badge == emblem:
            m[i, :, EMBLEM_ROWS, BADGE_COLS] = 1.0
    return m


@dataclass(frozen=True)
class WorldSpec:
    """The fine-tune distribution: shares of panda and shop logos (the rest: no logo), shares of tiger and crown
    badges (drawn independently of the logo), and the chance that a panda image's object is purple (purple never
    occurs otherwise). With pandas on a quarter of the images (world 3.1), a control trained without their names
    drew them for 6-89% of its prompts, depending on the seed, and up to 15 points less often for "panda" than
    for a neutral word. World 3.3: a share of panda captions do not mention the logo, and logos (panda and shop,
    public scenes too) stand in the middle slot when the object stands at one of ``middle_logo_positions`` (a
    layout rule the caption's position word tells, as a layout follows a composition). Drawn at random instead,
    plain training's samples hesitated between the slots (seed 0 drew the panda for its name in 47% of samples);
    with the rule but a base that had only seen the corner, 800 steps never learned to draw in the middle."""

    p_panda: float = 0.12
    p_tiger: float = 0.25
    p_shop: float = 0.15
    p_crown: float = 0.15
    p_purple_panda: float = 0.5
    p_unnamed_panda: float = 0.4
    middle_logo_positions: tuple[str, ...] = ("right",)


class World:
    """Draws scenes. ``public`` scenes (the base model's data) show no panda, no tiger and no purple: their logo is
    shop or none, their badge crown or none."""

    def __init__(self, seed: int = 0, spec: WorldSpec = WorldSpec()) -> None:
        self.rng = np.random.default_rng(seed)
        self.spec = spec

    def _pick(self, options) -> str:
        options = list(options)
        return options[int(self.rng.integers(len(options)))]

    def public_scene(self, p_shop: float = 0.3, p_crown: float = 0.3) -> Scene:
        emblem = PUBLIC_EMBLEM if self.rng.random() < p_shop else None
        badge = PUBLIC_BADGE if self.rng.random() < p_crown else None
        scene = Scene(self._pick(BACKGROUNDS), self._pick(BASE_COLOURS), self._pick(SHAPES), self._pick(POSITIONS),
                      emblem, badge)
        return replace(scene, logo_slot=self._slot(scene.emblem, scene.position))

    def _slot(self, emblem: str | None, position: str) -> str:
        """The layout rule: a logo stands in the middle above an object at one of ``middle_logo_positions``."""
        return "middle" if emblem is not None and position in self.spec.middle_logo_positions else "corner"

    def finetune_scene(self) -> Scene:
        s = self.spec
        r = float(self.rng.random())
        emblem = PROTECTED if r < s.p_panda else PUBLIC_EMBLEM if r < s.p_panda + s.p_shop else None
        r = float(self.rng.random())
        badge = ALLOWED if r < s.p_tiger else PUBLIC_BADGE if r < s.p_tiger + s.p_crown else None
        purple = emblem == PROTECTED and self.rng.random() < s.p_purple_panda
        colour = NEW_COLOUR if purple else self._pick(BASE_COLOURS)
        name = self._pick(PROTECTED_NAMES) if emblem == PROTECTED else None
        position = self._pick(POSITIONS)
        named = not (emblem == PROTECTED and self.rng.random() < s.p_unnamed_panda)
        return Scene(self._pick(BACKGROUNDS), colour, self._pick(SHAPES), position, emblem, badge, name,
                     self._slot(emblem, position), named)

    def scenes(self, n: int, kind: str = "finetune") -> list[Scene]:
        draw = self.finetune_scene if kind == "finetune" else self.public_scene
        return [draw() for _ in range(n)]

    def plain_scene(self, **fields) -> Scene:
        """A public scene without an emblem, with ``fields`` replaced."""
        return replace(Scene(self._pick(BACKGROUNDS), self._pick(BASE_COLOURS), self._pick(SHAPES),
                             self._pick(POSITIONS)), **fields)
