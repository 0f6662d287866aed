"""concept-exclusion: train diffusion models on real data without learning prohibited concepts.

    preset = load_preset("example-logo")
    subspace = ConceptSubspace.from_text_encoder(preset, tokenizer, text_encoder)
    exclusion = ConceptExclusion.attach(unet, subspace, optimizer=optimizer)
"""

from ._version import __version__
from .errors import (AuditError, ConceptExclusionError, LoraFileError, ModelFolderError, PresetError,
                     SafetensorsFileError, SubspaceError, TargetError)
from .exclusion import ConceptExclusion
from .options import AttachOptions
from .plan import Plan, context_readers, find_targets, plan_exclusion
from .preservation import OutputPreservation
from .preset import Concept, Preset, Projection, load_preset, parse_preset, shipped_presets
from .projector import Constraint, GradientProjector, WeightProjector, constraints_for
from .subspace import ConceptSubspace
from .targets import Target

__all__ = [
    "__version__", "AttachOptions", "AuditError", "ConceptExclusion", "ConceptExclusionError", "ConceptSubspace", "Concept",
    "Constraint", "GradientProjector", "LoraFileError", "ModelFolderError",
    "OutputPreservation", "Plan", "PresetError", "Preset", "Projection", "SafetensorsFileError", "SubspaceError", "TargetError",
    "Target", "WeightProjector", "constraints_for", "context_readers", "find_targets", "load_preset", "parse_preset",
    "plan_exclusion", "shipped_presets",
]
