"""Exceptions raised by concept-exclusion. Every message says what was wrong and where."""


class ConceptExclusionError(Exception):
    """Base class of every error this package raises on purpose."""


class PresetError(ConceptExclusionError):
    """A preset file is unreadable or invalid; the message names the file and the key."""


class SubspaceError(ConceptExclusionError):
    """A concept subspace cannot be built, loaded or matched to a model."""


class TargetError(ConceptExclusionError):
    """A model has no usable targets, or a target cannot be protected exactly."""


class SafetensorsFileError(ConceptExclusionError):
    """A safetensors file is unreadable, malformed or lacks what is needed."""


class LoraFileError(ConceptExclusionError):
    """A LoRA file holds no readable LoRA layers, or a layer's tensors are malformed."""


class AuditError(ConceptExclusionError):
    """The audit cannot proceed: a base model is unusable, or no concept basis can be had."""


class ModelFolderError(ConceptExclusionError):
    """A diffusers model folder (or hub id) cannot be read: missing parts, or a loader failed."""


class DataError(ConceptExclusionError):
    """Training data (a folder of images, an image) is unreadable or unusable; the message names the file."""
