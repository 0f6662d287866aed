"""Output preservation: captions that name a concept teach the image, never the name.

For each training caption that contains one of the preset's names or paraphrases, the image is
learned from the *scrubbed* caption (the names replaced by ``replacement``, "" by default), and the
prediction for the original caption is pulled towards a target made without gradient on the same
noisy input: the same model's prediction for the scrubbed caption (``target="scrub"``), or the
frozen base model's prediction for the original caption (``target="base"``, in the style of
differential output preservation). Captions that name no concept are trained as usual.

Invariant: the loss never has a term whose gradient makes the prediction for a named caption
differ from its target; the name can only come to mean what the scrubbed caption means (scrub)
or what it meant before training (base).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from concept_exclusion.concept.preset import Preset
from concept_exclusion.errors import ConceptExclusionError

log = logging.getLogger(__name__)

TARGETS = ("scrub", "base")
Predict = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass(frozen=True)
class PreservationLoss:
    """The parts of one step's loss: ``total`` is what to backpropagate."""

    total: torch.Tensor
    denoising: torch.Tensor
    preservation: torch.Tensor
    named: int


@dataclass(frozen=True)
class OutputPreservation:
    """Finds the preset's names in captions and builds the preservation loss (see the module docstring)."""

    phrases: tuple[str, ...]
    replacement: str = ""
    weight: float = 1.0
    target: str = "scrub"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConceptExclusionError(f"output preservation target must be one of {', '.join(TARGETS)}, "
                                        f"got {self.target!r}")
        if not self.phrases or not all(p.strip() for p in self.phrases):
            raise ConceptExclusionError("output preservation needs at least one non-empty name to look for")
        if not 0.0 < float(self.weight) <= 100.0:
            raise ConceptExclusionError(f"output preservation weight must be in (0, 100], got {self.weight}")

    @classmethod
    def from_preset(cls, preset: Preset, *, target: str | None = None, weight: float | None = None,
                    replacement: str = "") -> "OutputPreservation":
        """Every name and paraphrase of the preset's concepts (not its preserved ones). ``target`` and ``weight``
        default to the preset's ``[projection] output_preservation`` / ``preservation_weight`` ("scrub" when the
        preset says "none")."""
        phrases = tuple(dict.fromkeys(p for c in preset.concepts for p in c.prompts))
        chosen = target or preset.projection.output_preservation
        return cls(phrases, replacement, preset.projection.preservation_weight if weight is None else weight,
                   "scrub" if chosen == "none" else chosen)

    @classmethod
    def for_preset(cls, preset: Preset) -> "OutputPreservation | None":
        """The preservation the preset asks for (``[projection] output_preservation``), or None for "none"."""
        return None if preset.projection.output_preservation == "none" else cls.from_preset(preset)

    @functools.cached_property
    def _pattern(self) -> re.Pattern:
        """Built once per object: scrub runs on every caption of every training step."""
        longest_first = sorted(self.phrases, key=len, reverse=True)
        return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(p) for p in longest_first) + r")(?!\w)", re.IGNORECASE)

    def scrub(self, caption: str) -> str | None:
        """The caption with every name replaced (spaces tidied), or None when it names no concept."""
        text, n = self._pattern.subn(self.replacement, caption)
        return re.sub(r"\s{2,}", " ", text).strip() if n else None

    def split(self, captions: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        """(bool mask of the captions that name a concept, the captions the denoising loss reads)."""
        scrubbed = [self.scrub(c) for c in captions]
        mask = torch.tensor([s is not None for s in scrubbed], dtype=torch.bool)
        return mask, [c if s is None else s for c, s in zip(captions, scrubbed)]

    def loss(self, predict: Predict, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor,
             captions: Sequence[str], encode: Callable[[list[str]], object],
             base_predict: Predict | None = None) -> PreservationLoss:
        """One step's loss: mean squared error of ``predict(noisy, t, encode(scrubbed))`` against ``target`` over
        all rows, plus ``weight`` x the preservation error of the named rows (averaged over all rows).

        ``predict(x, t, cond)`` is the model being trained; ``base_predict`` the frozen base (target="base").
        """
        if self.target == "base" and base_predict is None:
            raise ConceptExclusionError("output preservation with target='base' needs base_predict (the frozen "
                                        "model, e.g. the LoRA disabled)")
        named, scrubbed = self.split(captions)
        pred = predict(noisy, timesteps, encode(scrubbed))
        denoising = torch.nn.functional.mse_loss(pred.float(), target.float())
        if not bool(named.any()):
            zero = denoising.new_zeros(())
            return PreservationLoss(denoising, denoising, zero, 0)
        idx = named.nonzero().squeeze(1).to(noisy.device)
        originals = [captions[i] for i in idx.tolist()]
        x, t = noisy[idx], timesteps[idx] if timesteps.ndim else timesteps
        with torch.no_grad():
            goal = pred[idx].detach() if self.target == "scrub" else base_predict(x, t, encode(originals))
        pred_named = predict(x, t, encode(originals))
        share = len(originals) / len(captions)
        preservation = torch.nn.functional.mse_loss(pred_named.float(), goal.float()) * share
        return PreservationLoss(denoising + self.weight * preservation, denoising, preservation, len(originals))
