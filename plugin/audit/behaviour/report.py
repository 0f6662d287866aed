"""The behavioural check's findings and its verdict, kept apart from the weight check's.

Verdicts: LEARNED (a figure is over the threshold: the LoRA makes the base better at producing the concept than at
producing the rest), NOT LEARNED (every figure at or under it), INCOMPLETE (no figure over it, but part of the file
could not be applied, so a NOT LEARNED would not be about the file as a loader uses it; or the images cannot show
that a file did not learn the concept: the preset's exemplars on plain canvases). Invariant: only ``verdict()``
decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LEARNED, NOT_LEARNED, INCOMPLETE = "LEARNED", "NOT LEARNED", "INCOMPLETE"
MEANING = {
    "name": "the concept's name in the preset's templates",
    "other names": "the preset's other names for it",
    "generic": "the templates with the name removed",
    "empty": "the empty prompt",
    "inversion": "text states optimised to reconstruct the exemplars (any trigger, a secret one included)",
}


@dataclass(frozen=True)
class Figure:
    """How much more the LoRA lowers the loss where the concept is than elsewhere (0: no more), with its 95%
    interval over the images."""

    value: float
    low: float
    high: float


@dataclass
class BehaviourReport:
    figures: dict[str, Figure]
    threshold: float
    images: int
    controls: int  # separate control images (0: the rest of each exemplar is its control)
    located: int  # exemplars whose concept region was found (the rest count as the concept whole)
    source: str
    applied: int  # layers the file's change was applied to
    skipped: dict[str, str]  # layer -> why its change could not be applied
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    conclusive: bool = True  # whether the images can show that a file did not learn the concept

    @property
    def largest(self) -> tuple[str, Figure]:
        return max(self.figures.items(), key=lambda kv: kv[1].value)

    def verdict(self) -> str:
        if any(f.value > self.threshold for f in self.figures.values()):
            return LEARNED
        if self.skipped or not self.applied or not self.conclusive:
            return INCOMPLETE
        return NOT_LEARNED

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict(), "threshold": self.threshold, "score": self.largest[1].value,
                "largest": self.largest[0], "images": self.images, "controls": self.controls,
                "located": self.located, "source": self.source, "conclusive": self.conclusive,
                "applied_layers": self.applied,
                "skipped_layers": self.skipped, "notes": self.notes, "config": self.config, "seconds": self.seconds,
                "figures": {k: {"value": f.value, "ci95": [f.low, f.high], "meaning": MEANING.get(k, k)}
                            for k, f in self.figures.items()}}
