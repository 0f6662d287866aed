"""``concept-exclusion audit``: what a LoRA file's weights point at (the weight check) and what it makes its base
model produce (the behavioural check), against a trusted preset and a trusted base model. Never imported by the
training path.

The public surface for packages that register a trusted base (``audit.bases``): ``BaseModel``, ``base_model``,
``Conditioning``."""

from concept_exclusion.audit.base_model import BaseModel, base_model
from concept_exclusion.audit.behaviour.denoising import Conditioning

__all__ = ["BaseModel", "Conditioning", "base_model"]
