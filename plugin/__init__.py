"""concept-exclusion: train diffusion models on real data without learning prohibited concepts.

    preset = load_preset("example-logo")
    subspace = ConceptSubspace.from_text_encoder(preset, tokenizer, text_encoder)
    exclusion = ConceptExclusion.attach(unet, subspace, optimizer=optimizer)
"""

from ._version import __version__
from .errors import ConceptExclusionError, PresetError, SafetensorsFileError, SubspaceError, TargetError
from .exclusion import ConceptExclusion
from .preset import Concept, Preset, Projection, load_preset, parse_preset, shipped_presets
from .projector import GradientProjector, WeightProjector
from .subspace import ConceptSubspace

__all__ = [
    "__version__", "ConceptExclusion", "ConceptExclusionError", "ConceptSubspace", "Concept", "GradientProjector",
    "PresetError", "Preset", "Projection", "SafetensorsFileError", "SubspaceError", "TargetError",
    "WeightProjector", "load_preset", "parse_preset", "shipped_presets",
]
