"""The concept subspace: an orthonormal basis per embedding space, built from a preset and an encoder.

Invariants: every basis is float64 with orthonormal columns; the same preset, encoder and
machine give the same basis bit for bit (float64 SVD, fixed sign convention); preserved
concepts' directions are removed before the basis is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from concept_exclusion.concept.codec import read_file, record_of, write_file
from concept_exclusion.concept.embeddings import concept_rows
from concept_exclusion.concept.encoders import CONTEXT, TextEncoders
from concept_exclusion.concept.preset import Preset
from concept_exclusion.errors import SubspaceError

def orthonormal_basis(rows: torch.Tensor, energy: float, max_rank: int) -> tuple[torch.Tensor, float]:
    """Top right-singular vectors of ``rows`` keeping ``energy`` of its squared norm (at most ``max_rank``).

    Returns (basis [d, r] float64, share of energy kept). Signs are fixed so each column's
    largest-magnitude entry is positive.
    """
    rows = rows.double()
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    power = s.square()
    total = float(power.sum())
    if total <= 0.0:
        raise SubspaceError("the concept embeddings are all zero: nothing to project")
    cum = torch.cumsum(power, 0) / total
    rank = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1
    rank = max(1, min(rank, max_rank, int((s > s[0] * 1e-10).sum())))
    basis = vh[:rank].T.contiguous()
    idx = basis.abs().argmax(dim=0)
    signs = torch.sign(basis[idx, torch.arange(rank)])
    return basis * signs, float(cum[rank - 1])


def remove_span(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``rows`` with their components in span(``basis``) removed."""
    return rows - (rows @ basis) @ basis.T


@dataclass
class ConceptSubspace:
    """Orthonormal bases (float64, [d, r]) per embedding space: 'context' (the text states the denoiser reads)
    and, for SDXL/SD3/Flux, 'pooled' (the pooled text embedding, e.g. SDXL's ``add_embedding`` input)."""

    bases: dict[str, torch.Tensor]
    preset: Preset | None = None
    encoder: str = "unknown"
    clip_skip: int | None = None
    energy_kept: dict[str, float] = field(default_factory=dict)
    sequence_length: int | None = None  # the T5/BERT length the concept was read at (None: CLIP only)
    _encoders: TextEncoders | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for space, u in self.bases.items():
            if u.ndim != 2 or u.shape[1] < 1 or u.shape[1] > u.shape[0]:
                raise SubspaceError(f"basis {space!r} must be [dim, rank] with 1 <= rank <= dim, got {list(u.shape)}")
            self.bases[space] = u.detach().double().cpu().contiguous()
        if CONTEXT not in self.bases:
            raise SubspaceError("a concept subspace needs a 'context' basis")

    # construction -----------------------------------------------------------------------------
    @classmethod
    def from_encoders(cls, preset: Preset, tokenizers, text_encoders, clip_skip: int | None = None, *,
                      family: str | None = None, max_length: int | None = None) -> "ConceptSubspace":
        """Any model family, from its tokenizer(s) and text encoder(s) in pipeline order (one object or a list).

        1 encoder: SD1.x/2.x CLIP, or one BERT/T5-style encoder; 2: SDXL (CLIP-L, CLIP-G) or Flux
        (CLIP, T5); 3: SD3 (CLIP-L, CLIP-G, T5); ``family`` overrides the guess (``encoders.FAMILIES``).
        ``clip_skip`` as in kohya (2 = penultimate layer; CLIP encoders only). ``max_length``: sequence
        length of the T5/BERT encoder (default: its tokenizer's ``model_max_length``).
        """
        toks = list(tokenizers) if isinstance(tokenizers, (list, tuple)) else [tokenizers]
        encs = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        if len(encs) == 1:
            toks = toks[:1]  # a script may hand over all tokenizers with its one encoder
        return cls._from_encoders(preset, TextEncoders(toks, encs, clip_skip, family=family, max_length=max_length))

    @classmethod
    def from_text_encoder(cls, preset: Preset, tokenizer, text_encoder, clip_skip: int | None = None
                          ) -> "ConceptSubspace":
        """One tokenizer and text encoder (SD1.x/2.x CLIP, or a BERT/T5-style encoder, given its attention mask).
        ``clip_skip`` as in kohya (2 = penultimate layer)."""
        return cls._from_encoders(preset, TextEncoders([tokenizer], [text_encoder], clip_skip))

    @classmethod
    def from_text_encoders(cls, preset: Preset, tokenizers: Sequence, text_encoders: Sequence,
                           clip_skip: int | None = None) -> "ConceptSubspace":
        """SDXL: both tokenizers and encoders; context is their concatenated states, plus a pooled basis."""
        if len(text_encoders) != 2:
            raise SubspaceError(f"from_text_encoders expects SDXL's two text encoders, got {len(text_encoders)}")
        return cls._from_encoders(preset, TextEncoders(tokenizers, text_encoders, clip_skip, family="sdxl"))

    @classmethod
    def _from_encoders(cls, preset: Preset, encoders: TextEncoders) -> "ConceptSubspace":
        p = preset.projection
        rows = concept_rows(preset.concepts, encoders, p.tokens)
        keep = concept_rows(preset.preserve, encoders, p.tokens) if preset.preserve else {}
        sub = cls.from_rows(rows, preset, keep, encoder=encoders.identity, clip_skip=encoders.clip_skip,
                            sequence_length=encoders.sequence_length)
        sub._encoders = encoders
        return sub

    @classmethod
    def from_rows(cls, rows: dict[str, torch.Tensor], preset: Preset | None = None,
                  preserve_rows: dict[str, torch.Tensor] | None = None, *, energy: float | None = None,
                  max_rank: int | None = None, encoder: str = "custom", clip_skip: int | None = None,
                  sequence_length: int | None = None) -> "ConceptSubspace":
        """Build from embedding rows per space; ``preserve_rows`` spans are removed first."""
        energy = energy if energy is not None else (preset.projection.energy if preset else 0.99)
        max_rank = max_rank if max_rank is not None else (preset.projection.max_rank if preset else 128)
        bases, kept = {}, {}
        for space, r in rows.items():
            r = r.double()
            if preserve_rows and space in preserve_rows:
                keep_basis, _ = orthonormal_basis(preserve_rows[space], energy, r.shape[1])
                before = float(r.square().sum())
                r = remove_span(r, keep_basis)
                # the preserve basis drops up to (1 - energy) of its rows' energy, so a residual no larger
                # than that is truncation residue, not a concept of its own (identical lists leave ~0.8%)
                if float(r.square().sum()) <= max(1e-10, (1.0 - energy) * (1 + 1e-9)) * before:
                    raise SubspaceError(f"space {space!r}: the [[preserve]] concepts cover the excluded concepts "
                                        f"entirely; nothing would be excluded")
            bases[space], kept[space] = orthonormal_basis(r, energy, max_rank)
        return cls(bases, preset, encoder, clip_skip, kept, sequence_length)

    def recompute(self) -> "ConceptSubspace":
        """Re-encode the preset with the same (possibly trained) encoders."""
        if self._encoders is None or self.preset is None:
            raise SubspaceError("this subspace was not built from text encoders, so it cannot be recomputed")
        return self._from_encoders(self.preset, self._encoders)

    @property
    def can_recompute(self) -> bool:
        return self._encoders is not None and self.preset is not None

    # accessors -------------------------------------------------------------------------------
    def basis(self, space: str = CONTEXT) -> torch.Tensor:
        if space not in self.bases:
            raise SubspaceError(f"no {space!r} basis in this subspace (has: {', '.join(self.bases)})")
        return self.bases[space]

    def dim(self, space: str = CONTEXT) -> int:
        return self.basis(space).shape[0]

    def rank(self, space: str = CONTEXT) -> int:
        return self.basis(space).shape[1]

    @property
    def sha256(self) -> str:
        """Hash of the bases' bytes (float64), space by space in sorted order."""
        import hashlib

        h = hashlib.sha256()
        for space in sorted(self.bases):
            h.update(space.encode())
            h.update(self.bases[space].numpy().tobytes())
        return h.hexdigest()

    # persistence (concept_exclusion.concept.codec) ---------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the bases as float64 safetensors with a description in the metadata (atomically)."""
        write_file(path, record_of(self))

    @classmethod
    def load(cls, path: str | Path) -> "ConceptSubspace":
        """Read a file ``save`` wrote; ``SafetensorsFileError`` when it is not one, or is damaged."""
        return cls(**vars(read_file(path)))
