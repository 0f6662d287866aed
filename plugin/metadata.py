"""Provenance metadata in our own ``concept_exclusion.*`` namespace of a safetensors header.

Invariants: every value is a string; host trainers' keys (``ss_*``, ``modelspec.*``, diffusers'
``format``/``lora_adapter_metadata``) are never added or changed here; the basis is stored as
base64 of float16 row-major bytes, so a 2048 x 64 basis costs about 350 KB of header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from concept_exclusion.concept.codec import basis_from_header, decode_basis, encode_basis, record_of, to_header
from concept_exclusion.errors import SafetensorsFileError

PREFIX = "concept_exclusion."
__all__ = ["PREFIX", "Provenance", "decode_basis", "encode_basis", "ours", "provenance_metadata", "read_basis",
           "read_provenance", "subspace_metadata"]


@dataclass(frozen=True)
class Provenance:
    """What a trained file records about its exclusion (built by ``ConceptExclusion.provenance``).

    ``subspace``: the concept subspace (anything with its attributes); ``project_context``: whether the
    exclusion was attached with context projection; ``leakage``: per target, measured when the record was made.
    """

    subspace: object
    mode: str
    strength: float
    target_sets: tuple[str, ...]
    target_layers: int
    project_context: bool
    leakage: dict[str, float]
    steps: int
    frozen_layers: tuple[str, ...] = ()  # targets the constraint leaves no freedom (warned at attach)


def subspace_metadata(subspace) -> dict[str, str]:
    """Keys describing the preset, encoder and bases (``codec.to_header`` under our prefix)."""
    return to_header(record_of(subspace), PREFIX)


def provenance_metadata(record: Provenance) -> dict[str, str]:
    """Everything ``subspace_metadata`` records, plus mode, targets and the leakage in ``record``."""
    leak = record.leakage
    meta = subspace_metadata(record.subspace)
    meta.update({
        PREFIX + "mode": record.mode,
        PREFIX + "strength": repr(record.strength),
        PREFIX + "targets": json.dumps(list(record.target_sets)),
        PREFIX + "target_layers": str(record.target_layers),
        PREFIX + "project_context": "true" if record.project_context else "false",
        PREFIX + "leakage": json.dumps({k: float(f"{v:.3e}") for k, v in sorted(leak.items())}),
        PREFIX + "leakage_max": f"{max(leak.values(), default=0.0):.3e}",
        PREFIX + "steps": str(record.steps),
        PREFIX + "frozen_layers": json.dumps(list(record.frozen_layers)),
    })
    return meta


def read_basis(metadata: dict[str, str], space: str = "context", source: str = "<metadata>") -> torch.Tensor | None:
    """The basis a file carries for ``space`` (None when it carries none)."""
    return basis_from_header(metadata, PREFIX, space, source)


def ours(metadata: dict[str, str]) -> dict[str, str]:
    """Only the keys in our namespace."""
    return {k: v for k, v in metadata.items() if k.startswith(PREFIX)}


_JSON_KEYS = ("ranks", "energy_kept", "targets", "leakage")


def read_provenance(metadata: dict[str, str], source: str = "<metadata>") -> dict[str, object]:
    """Our keys without the prefix, JSON-valued ones parsed; each basis summarised as its shape.

    Empty for a file this project did not write. A malformed JSON value raises
    ``SafetensorsFileError`` naming the key.
    """
    out: dict[str, object] = {}
    for key, value in sorted(ours(metadata).items()):
        name = key[len(PREFIX):]
        if name.startswith("basis."):
            space = name[len("basis."):]
            out[f"basis.{space}"] = f"{metadata.get(PREFIX + 'basis_shape.' + space, '?')} float16, " \
                                    f"{len(value)} base64 chars"
            continue
        if name.startswith("basis_shape."):
            continue
        if name in _JSON_KEYS:
            try:
                out[name] = json.loads(value)
            except ValueError:
                raise SafetensorsFileError(f"{source}: metadata {key} is not valid JSON") from None
            continue
        out[name] = value
    return out
