"""The subspace codec: one record (bases, preset, encoder, clip_skip, energy kept, T5 sequence length) in its three
encodings.

- a safetensors file (``ConceptSubspace.save`` / ``load``): float64 tensors ``basis.<space>``, a description
  in the header; bit-exact;
- a JSON document (the transformers callback's state in ``trainer_state.json``): float64 bytes in base64; bit-exact;
- header keys in our ``concept_exclusion.*`` namespace of a LoRA file (``concept_exclusion.metadata``): each
  basis as base64 float16, re-orthonormalised on reading (about 1e-3).

Invariants: every decoder checks that each basis is a 2-D float64 matrix with orthonormal columns and
that an embedded preset matches its recorded sha256, and raises the caller's error type naming the
source; nothing here imports ``ConceptSubspace`` (it builds from a ``SubspaceRecord``).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from concept_exclusion._version import __version__
from concept_exclusion.concept.preset import Preset, parse_preset
from concept_exclusion.errors import SafetensorsFileError, SubspaceError
from concept_exclusion.safeio import read_safetensors, write_safetensors

FILE_FORMAT = "concept-exclusion-subspace/1"
JSON_FORMAT = "concept-exclusion-subspace-json/1"


@dataclass
class SubspaceRecord:
    """What every encoding carries; ``ConceptSubspace(**vars(record))`` rebuilds the subspace."""

    bases: dict[str, torch.Tensor]
    preset: Preset | None = None
    encoder: str = "unknown"
    clip_skip: int | None = None
    energy_kept: dict[str, float] = field(default_factory=dict)
    sequence_length: int | None = None


def record_of(subspace) -> SubspaceRecord:
    """The record of anything with a subspace's attributes (``bases``, ``preset``, ``encoder``, ...)."""
    return SubspaceRecord(dict(subspace.bases), subspace.preset, subspace.encoder, subspace.clip_skip,
                          dict(subspace.energy_kept), subspace.sequence_length)


def check_bases(bases: dict[str, torch.Tensor], source: str, error: type[Exception]) -> None:
    """Every basis a float64 matrix with orthonormal columns, and a 'context' one among them."""
    if "context" not in bases:
        raise error(f"{source}: no 'context' basis")
    for space, u in bases.items():
        if u.ndim != 2 or u.dtype != torch.float64:
            raise error(f"{source}: basis {space!r} must be a float64 matrix, got {u.dtype} {list(u.shape)}")
        if not torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-8):
            raise error(f"{source}: basis {space!r} does not have orthonormal columns")


def _preset(toml: str, sha256: str | None, source: str, error: type[Exception]) -> Preset | None:
    if not toml:
        return None
    preset = parse_preset(toml, source=source)
    if sha256 is not None and preset.sha256 != sha256:
        raise error(f"{source}: embedded preset does not match its recorded sha256")
    return preset


# safetensors file -----------------------------------------------------------------------------------
def write_file(path: str | Path, rec: SubspaceRecord) -> None:
    """The bases as float64 tensors with a description in the metadata, written atomically."""
    meta = {
        "format": FILE_FORMAT, "version": __version__, "encoder": rec.encoder,
        "clip_skip": "" if rec.clip_skip is None else str(rec.clip_skip),
        "sequence_length": "" if rec.sequence_length is None else str(rec.sequence_length),
        "spaces": json.dumps({s: {"dim": int(u.shape[0]), "rank": int(u.shape[1]),
                                  "energy_kept": rec.energy_kept.get(s)} for s, u in sorted(rec.bases.items())}),
        "preset_name": rec.preset.name if rec.preset else "",
        "preset_sha256": rec.preset.sha256 if rec.preset else "",
        "preset_toml": rec.preset.toml_text if rec.preset else "",
    }
    write_safetensors(path, {f"basis.{s}": u for s, u in rec.bases.items()}, meta)


def read_file(path: str | Path) -> SubspaceRecord:
    """Inverse of ``write_file``; ``SafetensorsFileError`` names what is wrong."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FILE_FORMAT:
        raise SafetensorsFileError(f"{path}: not a concept subspace file (metadata 'format' is "
                                   f"{meta.get('format')!r}, expected {FILE_FORMAT!r})")
    bases = {k[len("basis."):]: v for k, v in tensors.items() if k.startswith("basis.")}
    check_bases(bases, str(path), SafetensorsFileError)
    preset = _preset(meta.get("preset_toml", ""), meta.get("preset_sha256"), f"{path}:preset_toml",
                     SafetensorsFileError)
    try:
        spaces = json.loads(meta.get("spaces", "{}"))
        kept = {s: float(v["energy_kept"]) for s, v in spaces.items() if v.get("energy_kept") is not None}
    except (ValueError, TypeError, AttributeError, KeyError):
        raise SafetensorsFileError(f"{path}: metadata 'spaces' is malformed") from None
    clip_skip = int(meta["clip_skip"]) if meta.get("clip_skip", "").isdigit() else None
    length = int(meta["sequence_length"]) if meta.get("sequence_length", "").isdigit() else None
    return SubspaceRecord(bases, preset, meta.get("encoder", "unknown"), clip_skip, kept, length)


# JSON document --------------------------------------------------------------------------------------
def to_json(rec: SubspaceRecord) -> dict[str, Any]:
    """Bases as base64 of float64 little-endian bytes (bit-exact), with the preset and encoder identity."""
    return {
        "format": JSON_FORMAT,
        "bases": {s: {"shape": list(u.shape), "float64": base64.b64encode(u.numpy().astype("<f8").tobytes()).decode()}
                  for s, u in sorted(rec.bases.items())},
        "encoder": rec.encoder,
        "clip_skip": rec.clip_skip,
        "sequence_length": rec.sequence_length,
        "energy_kept": dict(rec.energy_kept),
        "preset_toml": rec.preset.toml_text if rec.preset is not None else "",
        "preset_source": rec.preset.source if rec.preset is not None else "",
    }


def from_json(doc: dict[str, Any], source: str = "callback state") -> SubspaceRecord:
    """Inverse of ``to_json``; ``SubspaceError`` names what is wrong."""
    if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
        raise SubspaceError(f"{source}: not a {JSON_FORMAT} document")
    bases = {}
    try:
        for space, entry in doc["bases"].items():
            rows, cols = (int(v) for v in entry["shape"])
            raw = np.frombuffer(base64.b64decode(entry["float64"], validate=True), dtype="<f8")
            if raw.size != rows * cols:
                raise ValueError(f"basis {space!r} holds {raw.size} values, expected {rows} x {cols}")
            bases[space] = torch.from_numpy(raw.copy()).reshape(rows, cols)
    except (KeyError, TypeError, ValueError) as exc:
        raise SubspaceError(f"{source}: malformed subspace ({exc})") from None
    check_bases(bases, source, SubspaceError)
    preset = _preset(doc.get("preset_toml") or "", None, doc.get("preset_source") or f"<{source}>", SubspaceError)
    length = doc.get("sequence_length")
    return SubspaceRecord(bases, preset, doc.get("encoder", "unknown"), doc.get("clip_skip"),
                          {k: float(v) for k, v in (doc.get("energy_kept") or {}).items()},
                          length if isinstance(length, int) and not isinstance(length, bool) else None)


# header keys ----------------------------------------------------------------------------------------
def encode_basis(basis: torch.Tensor) -> str:
    """Base64 of float16 row-major little-endian bytes (a 2048 x 64 basis: about 350 KB)."""
    return base64.b64encode(basis.detach().cpu().to(torch.float16).numpy().astype("<f2").tobytes()).decode("ascii")


def decode_basis(text: str, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``encode_basis``, re-orthonormalised in float64 (fp16 storage costs ~1e-3)."""
    raw = np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), dtype="<f2")
    if raw.size != shape[0] * shape[1]:
        raise ValueError(f"basis holds {raw.size} values, expected {shape[0]} x {shape[1]}")
    q, r = torch.linalg.qr(torch.from_numpy(raw.astype(np.float64)).reshape(shape))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))


def to_header(rec: SubspaceRecord, prefix: str) -> dict[str, str]:
    """String keys (under ``prefix``) describing the preset, encoder and bases."""
    meta = {
        prefix + "version": __version__,
        prefix + "encoder": rec.encoder,
        prefix + "clip_skip": "" if rec.clip_skip is None else str(rec.clip_skip),
        prefix + "ranks": json.dumps({s: int(u.shape[1]) for s, u in sorted(rec.bases.items())}),
        prefix + "energy_kept": json.dumps({s: round(v, 6) for s, v in sorted(rec.energy_kept.items())}),
    }
    if rec.sequence_length is not None:
        meta[prefix + "sequence_length"] = str(rec.sequence_length)
    if rec.preset is not None:
        p = rec.preset
        meta.update({prefix + "preset_name": p.name, prefix + "preset_version": p.version,
                     prefix + "preset_sha256": p.sha256, prefix + "preset_toml": p.toml_text,
                     prefix + "tokens": p.projection.tokens})
    for space, u in sorted(rec.bases.items()):
        meta[prefix + f"basis.{space}"] = encode_basis(u)
        meta[prefix + f"basis_shape.{space}"] = f"{u.shape[0]}x{u.shape[1]}"
    return meta


def basis_from_header(metadata: dict[str, str], prefix: str, space: str, source: str) -> torch.Tensor | None:
    """The basis a header carries for ``space`` (None when it carries none); malformed: ``SafetensorsFileError``."""
    text = metadata.get(prefix + f"basis.{space}")
    if text is None:
        return None
    shape_text = metadata.get(prefix + f"basis_shape.{space}", "")
    try:
        rows, cols = (int(v) for v in shape_text.split("x"))
        return decode_basis(text, (rows, cols))
    except (ValueError, TypeError) as exc:
        raise SafetensorsFileError(f"{source}: metadata {prefix}basis.{space} is malformed ({exc})") from None
