"""Checks of user-facing settings shared by the API, the command line and every integration (no torch here).

Invariant: each rule is written once; callers choose only the error type and how the setting is
named in the message (``strength`` in the API, ``--concept_strength``, ``network_args concept_strength``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from concept_exclusion.concept.preset import MODES
from concept_exclusion.errors import ConceptExclusionError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(value: Any, *, empty: bool | None = None) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off, any case) or a bool as it is; ``""`` gives ``empty``
    when that is set. Anything else is a ``ValueError`` naming the value."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "" and empty is not None:
        return empty
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def check_mode_strength(mode: str | None, strength: float | None, *, mode_name: str = "mode",
                        strength_name: str = "strength", error: type[Exception] = ConceptExclusionError) -> None:
    """Refuse an unknown mode, a strength outside [0, 1], and a strength other than 1 with exact mode.

    ``mode`` None (the preset's) and ``strength`` None (the default) pass; a strength with mode None
    is checked against exact mode only by the caller that knows the preset's mode.
    """
    if mode is not None and mode not in MODES:
        raise error(f"{mode_name} must be one of {', '.join(MODES)}, got {mode!r}")
    if strength is None:
        return
    if not 0.0 <= float(strength) <= 1.0:
        raise error(f"{strength_name} must be in [0, 1], got {strength}")
    if mode == "exact" and float(strength) != 1.0:
        raise error(f"{strength_name} applies to {mode_name}=gradient only; exact mode always projects fully")


@dataclass(frozen=True)
class AttachOptions:
    """How ``ConceptExclusion.attach`` runs, beside the preset's ``[projection]`` (which says what it does).

    ``allow_text_encoder_training``: accept a text encoder that trains; the concept is then re-encoded every
    ``reencode_every`` optimizer steps and the exclusion is approximate in between. ``leakage_snapshots``: keep a
    CPU fp32 copy of each constrained full weight so ``leakage`` reports ||dW U|| / ||dW||; False saves that memory
    (SD1.5: 77 MB, SDXL: 1.4 GB) and reports ||W U - W0 U|| / ||W0 U|| for full weights instead.
    """

    allow_text_encoder_training: bool = False
    reencode_every: int = 100
    leakage_snapshots: bool = True

    def __post_init__(self) -> None:
        if int(self.reencode_every) < 1:
            raise ConceptExclusionError(f"reencode_every must be at least 1, got {self.reencode_every}")
