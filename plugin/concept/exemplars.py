"""A preset's ``[exemplars]`` table as data: exemplar images of a concept, pinned by sha256 (what the concept looks
like, not what it is called; paths relative to the preset's folder, or inside the package for a shipped preset),
and how the concept is found and treated in training images.

Invariant: this is data only; loading a preset never opens an exemplar (``regions.exemplars`` reads them).
"""

from __future__ import annotations

from dataclasses import dataclass

REGION_TREATMENTS = ("ignore", "base")  # masked loss, or the frozen base model's prediction as the region's target
MAX_EXEMPLARS = 64


@dataclass(frozen=True)
class ExemplarFile:
    """One exemplar: ``path`` as the preset writes it (relative, '/'-separated) and the sha256 of its bytes."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Exemplars:
    """The preset's exemplars and how they are used: a training image's region whose normalised cross-correlation
    with an exemplar (resized by each of ``scales``) reaches ``threshold`` is the concept's, grown by ``dilate``
    pixels; ``region`` says what the loss does there ("ignore": nothing is learned from it; "base": it is taught
    the frozen base model's prediction)."""

    files: tuple[ExemplarFile, ...]
    threshold: float = 0.7
    scales: tuple[float, ...] = (1.0,)
    dilate: int = 1
    region: str = "ignore"
