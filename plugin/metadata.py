"""Provenance metadata in our own ``concept_exclusion.*`` namespace of a safetensors header.

Invariants: every value is a string; host trainers' keys (``ss_*``, ``modelspec.*``, diffusers'
``format``/``lora_adapter_metadata``) are never added or changed here; the basis is stored as
base64 of float16 row-major bytes, so a 2048 x 64 basis costs about 350 KB of header.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._version import __version__
from .errors import SafetensorsFileError

if TYPE_CHECKING:
    from .exclusion import ConceptExclusion
    from .subspace import ConceptSubspace

PREFIX = "concept_exclusion."


def encode_basis(basis: torch.Tensor) -> str:
    return base64.b64encode(basis.detach().cpu().to(torch.float16).numpy().astype("<f2").tobytes()).decode("ascii")


def decode_basis(text: str, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``encode_basis``, re-orthonormalised in float64 (fp16 storage costs ~1e-3)."""
    raw = np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), dtype="<f2")
    if raw.size != shape[0] * shape[1]:
        raise ValueError(f"basis holds {raw.size} values, expected {shape[0]} x {shape[1]}")
    q, r = torch.linalg.qr(torch.from_numpy(raw.astype(np.float64)).reshape(shape))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))


def subspace_metadata(subspace: "ConceptSubspace") -> dict[str, str]:
    """Keys describing the preset, encoder and bases."""
    meta = {
        PREFIX + "version": __version__,
        PREFIX + "encoder": subspace.encoder,
        PREFIX + "clip_skip": "" if subspace.clip_skip is None else str(subspace.clip_skip),
        PREFIX + "ranks": json.dumps({s: subspace.rank(s) for s in sorted(subspace.bases)}),
        PREFIX + "energy_kept": json.dumps({s: round(v, 6) for s, v in sorted(subspace.energy_kept.items())}),
    }
    if subspace.preset is not None:
        p = subspace.preset
        meta.update({PREFIX + "preset_name": p.name, PREFIX + "preset_version": p.version,
                     PREFIX + "preset_sha256": p.sha256, PREFIX + "preset_toml": p.toml_text,
                     PREFIX + "tokens": p.projection.tokens})
    for space, u in sorted(subspace.bases.items()):
        meta[PREFIX + f"basis.{space}"] = encode_basis(u)
        meta[PREFIX + f"basis_shape.{space}"] = f"{u.shape[0]}x{u.shape[1]}"
    return meta


def exclusion_metadata(exclusion: "ConceptExclusion") -> dict[str, str]:
    """Everything ``subspace_metadata`` records, plus mode, targets and the leakage measured now."""
    leak = exclusion.leakage()
    meta = subspace_metadata(exclusion.subspace)
    meta.update({
        PREFIX + "mode": exclusion.mode,
        PREFIX + "strength": repr(exclusion.strength),
        PREFIX + "targets": json.dumps(list(exclusion.target_sets)),
        PREFIX + "target_layers": str(len(exclusion.targets)),
        PREFIX + "project_context": "true" if exclusion.project_context else "false",
        PREFIX + "leakage": json.dumps({k: float(f"{v:.3e}") for k, v in sorted(leak.items())}),
        PREFIX + "leakage_max": f"{max(leak.values(), default=0.0):.3e}",
        PREFIX + "steps": str(exclusion.steps),
    })
    return meta


def read_basis(metadata: dict[str, str], space: str = "context", source: str = "<metadata>") -> torch.Tensor | None:
    """The basis a file carries for ``space`` (None when it carries none)."""
    text = metadata.get(PREFIX + f"basis.{space}")
    if text is None:
        return None
    shape_text = metadata.get(PREFIX + f"basis_shape.{space}", "")
    try:
        rows, cols = (int(v) for v in shape_text.split("x"))
        return decode_basis(text, (rows, cols))
    except (ValueError, TypeError) as exc:
        raise SafetensorsFileError(f"{source}: metadata {PREFIX}basis.{space} is malformed ({exc})") from None


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
