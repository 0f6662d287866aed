"""An audit's findings and its verdict, with the exit code each verdict has.

Verdicts, most severe first:
- FLAGGED (1): a measured layer puts more than the threshold of its change on the trusted concept subspace.
- UNVERIFIED (3): no trusted base model was given (the file's own basis, preset, clip_skip and targets
  are claims, never inputs), or something the file changes on a layer that reads text (or a layer or
  tensor the audit cannot place) was not measured, or the file changes no layer that reads the text (nothing
  was checked: a weight check then says nothing, e.g. a Flux LoRA on the joint blocks only).
- PASS-APPROXIMATE (5): every check passed, but the file also changes text-encoder layers, so the
  concept's own embeddings may move; the guarantee holds only for the embeddings the base encodes.
- PASS (0): every tensor was placed, at least one text-reading layer was measured, and every one measured
  against the trusted preset re-encoded with the trusted base is at or under the threshold. This says where
  the file's weights point, not whether the file draws the concept.
Codes 2 (unusable input) and 4 (internal error) come from the command line, never from a report.

The behavioural check (``behaviour.report``) is reported beside this verdict, never merged into it; it decides
the exit code when it ran and found the concept learned: LEARNED exits 6 whatever the weight verdict, and an
INCOMPLETE check keeps a weight PASS from exit 0 (3).

Invariant: only ``verdict()`` decides the weight verdict; PASS needs ``verified`` (a trusted basis) and no
blocking item; only ``exit_code`` combines the two checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from concept_exclusion.audit.behaviour.report import INCOMPLETE, LEARNED, BehaviourReport

PASS, FLAGGED, UNVERIFIED, PASS_APPROXIMATE = "PASS", "FLAGGED", "UNVERIFIED", "PASS-APPROXIMATE"
EXIT_CODES = {PASS: 0, FLAGGED: 1, UNVERIFIED: 3, PASS_APPROXIMATE: 5}  # 2, 4, 141: cli.EXIT_*
EXIT_LEARNED = 6


@dataclass
class LayerReport:
    """One layer of the model the file changes: its role, how it was measured and what blocks a PASS."""

    name: str
    role: str  # key | value | pooled | query | out | dit-context | dit-pooled | elsewhere | text-encoder
    kinds: list[str]
    share: float | None = None  # ||constrained part of dW|| / ||dW||, worst over clip_skip values and adapters
    concept_change: float | None = None  # ||dW c|| / ||W0 c|| (with the base)
    checked: bool = False  # counts toward FLAGGED/PASS
    blocking: str = ""  # why this layer keeps the verdict from PASS ("" when it does not)
    note: str = ""

    def over(self, threshold: float) -> bool:
        return self.checked and self.share is not None and self.share > threshold


@dataclass
class AuditReport:
    file: str
    layout: str
    threshold: float
    target_sets: tuple[str, ...]
    verified: bool  # the basis was re-encoded from the trusted preset with the trusted base
    preset: dict[str, str] | None  # name, sha256, source of the trusted preset
    base: dict[str, str] | None  # source and kind of the trusted base
    clip_skips: tuple[int, ...]
    sequence_length: int | None  # the T5/BERT length the base's encoders read the preset at (None: CLIP only)
    layers: list[LayerReport]
    unknown_keys: list[str]
    claims: dict[str, str]  # what the file says about itself (sanitised only when printed)
    notes: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    by_clip_skip: dict[int, float] = field(default_factory=dict)  # largest checked share per clip_skip value
    behaviour: BehaviourReport | None = None
    behaviour_note: str = ""  # why the behavioural check did not run

    @property
    def flagged(self) -> list[LayerReport]:
        """Layers over the threshold of the trusted basis (none without one: claimed shares decide nothing)."""
        return [r for r in self.layers if r.over(self.threshold)] if self.verified else []

    @property
    def blocking(self) -> list[LayerReport]:
        return [r for r in self.layers if r.blocking]

    @property
    def text_encoder_layers(self) -> list[LayerReport]:
        return [r for r in self.layers if r.role == "text-encoder"]

    @property
    def checked(self) -> list[LayerReport]:
        """Text-reading layers measured against the trusted basis (a PASS needs at least one)."""
        return [r for r in self.layers if r.checked and r.share is not None]

    @property
    def max_share(self) -> float:
        return max((r.share for r in self.layers if r.checked and r.share is not None), default=0.0)

    def verdict(self) -> str:
        if self.flagged:
            return FLAGGED
        if not self.verified or self.blocking or self.unknown_keys or not self.checked:
            return UNVERIFIED
        if self.text_encoder_layers:
            return PASS_APPROXIMATE
        return PASS

    @property
    def exit_code(self) -> int:
        code = EXIT_CODES[self.verdict()]
        if self.behaviour is not None:
            if self.behaviour.verdict() == LEARNED:
                return EXIT_LEARNED
            if self.behaviour.verdict() == INCOMPLETE and code in (EXIT_CODES[PASS], EXIT_CODES[PASS_APPROXIMATE]):
                return EXIT_CODES[UNVERIFIED]
        return code

    @property
    def passed(self) -> bool:
        return self.verdict() == PASS

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file, "layout": self.layout, "verdict": self.verdict(), "exit_code": self.exit_code,
            "verified": self.verified, "preset": self.preset, "base": self.base, "clip_skips": list(self.clip_skips),
            "sequence_length": self.sequence_length,
            "ranks": self.ranks, "max_share_by_clip_skip": {str(k): v for k, v in self.by_clip_skip.items()},
            "threshold": self.threshold, "target_sets": list(self.target_sets),
            "max_share": self.max_share, "flagged": [r.name for r in self.flagged],
            "blocking": {r.name: r.blocking for r in self.blocking}, "unknown_keys": self.unknown_keys,
            "claims": self.claims, "notes": self.notes,
            "layers": [{"name": r.name, "role": r.role, "kinds": r.kinds, "share": r.share,
                        "concept_change": r.concept_change, "checked": r.checked, "over": r.over(self.threshold),
                        "blocking": r.blocking, "note": r.note} for r in self.layers],
            "behaviour": self.behaviour.to_json() if self.behaviour is not None else {"verdict": None,
                                                                                      "why": self.behaviour_note},
        }
