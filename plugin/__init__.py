"""concept-exclusion: train diffusion models on real data without learning prohibited concepts.

    preset = load_preset("example-logo")
    subspace = ConceptSubspace.from_text_encoder(preset, tokenizer, text_encoder)
    exclusion = ConceptExclusion.attach(unet, subspace, optimizer=optimizer)
"""

from concept_exclusion._version import __version__
from concept_exclusion.concept.preset import Concept, Preset, Projection, load_preset, parse_preset, shipped_presets
from concept_exclusion.concept.subspace import ConceptSubspace
from concept_exclusion.errors import (AuditError, ConceptExclusionError, DataError, LoraFileError, ModelFolderError,
                                      PresetError,
                                      SafetensorsFileError, SubspaceError, TargetError)
from concept_exclusion.exclusion import ConceptExclusion
from concept_exclusion.hooks.gradient import Constraint, GradientProjector, WeightProjector, constraints_for
from concept_exclusion.model.plan import Plan, context_readers, find_targets, plan_exclusion
from concept_exclusion.model.targets import Target
from concept_exclusion.options import AttachOptions
from concept_exclusion.preservation import OutputPreservation

__all__ = [
    "__version__", "AttachOptions", "AuditError", "Concept", "ConceptExclusion", "ConceptExclusionError", "DataError",
    "ConceptSubspace", "Constraint", "GradientProjector", "LoraFileError", "ModelFolderError", "OutputPreservation",
    "Plan", "Preset", "PresetError", "Projection", "SafetensorsFileError", "SubspaceError", "Target", "TargetError",
    "WeightProjector", "constraints_for", "context_readers", "find_targets", "load_preset", "parse_preset",
    "plan_exclusion", "shipped_presets",
]
