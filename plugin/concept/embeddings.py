"""Concept embeddings: the rows of text-encoder states that carry a concept, as the denoiser would read them.

``concept_rows`` turns a preset's concepts into the rows whose span the subspace must cover, per
embedding space (``context``; ``pooled`` where the family has one). The encoders themselves, and
the one path that runs them, are ``concept_exclusion.concept.encoders``.

Invariant: for a causal (CLIP) segment a prompt's positions before the concept carry nothing of it,
so they are never rows; for a bidirectional (BERT, T5) segment every position may carry it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from concept_exclusion.concept.encoders import CONTEXT, POOLED, Encoded, Segment, TextEncoders
from concept_exclusion.concept.preset import Concept
from concept_exclusion.errors import SubspaceError

__all__ = ["CONTEXT", "POOLED", "Encoded", "TextEncoders", "concept_rows"]


def _segment_rows(h: torch.Tensor, hn: torch.Tensor | None, span: tuple[int, int], n_span: tuple[int, int],
                  segment: Segment, tokens: str) -> list[torch.Tensor]:
    """One prompt's rows in one segment (``h`` [L, d]; ``hn`` the neutral prompt's states, for contrastive)."""
    L = segment.length
    start, end = span
    rows: list[torch.Tensor] = []
    if tokens in ("concept", "contrastive+concept"):
        rows.append(h[start:end])
    if tokens == "all":
        rows.append(h[start:] if segment.causal else h)
    if hn is not None:
        n_start, n_end = n_span
        if not segment.causal:  # the prefix is the same text: aligned by index
            before = min(start, n_start)
            if before > 0:
                rows.append(h[:before] - hn[:before])
        n_len = max(n_end - n_start, 1)
        span_idx = torch.tensor([n_start + min(k, n_len - 1) for k in range(end - start)])
        rows.append(h[start:end] - hn[span_idx.clamp(max=L - 1)])
        after = L - max(end, n_end)  # later positions aligned by their offset from the span's end
        if after > 0:
            rows.append(h[end:end + after] - hn[n_end:n_end + after])
    return rows


def concept_rows(concepts: Sequence[Concept], encoders: TextEncoders, tokens: str) -> dict[str, torch.Tensor]:
    """Rows (float64) whose span must be protected, per embedding space ('context', and 'pooled' where it exists).

    tokens: 'concept' = the concept's own positions; 'all' = those and every later position for a
    causal encoder (CLIP: later tokens, end-of-text and padding carry the concept too), every
    position of the prompt for a bidirectional one; 'contrastive' = the same positions minus the
    prompt with the concept replaced by the neutral phrase, position by position (earlier positions
    aligned by index, later ones by their offset from the span's end); 'contrastive+concept' = the
    contrastive rows and the concept's own positions. A family with several segments (SD3: CLIP then
    T5) gives rows from each.
    """
    items = [(tpl, p, neutral_text) for c in concepts for tpl, p, neutral_text in c.texts()]
    neutrals = [c.neutral for c in concepts for _ in c.texts()]
    enc: Encoded = encoders.encode([tpl.replace("{}", p) for tpl, p, _ in items])
    contrastive = tokens in ("contrastive", "contrastive+concept")
    enc_n = encoders.encode([n for _, _, n in items]) if contrastive else None
    rows: list[torch.Tensor] = []
    kept: list[int] = []
    for i, (tpl, phrase, _) in enumerate(items):
        for segment in enc.segments:
            start, end = encoders.span(tpl, phrase, segment)
            if start >= segment.length - 1 or end <= start:
                continue  # the concept was truncated away (or tokenised to nothing) in this template
            sl = slice(segment.start, segment.start + segment.length)
            n_span = encoders.span(tpl, neutrals[i], segment) if contrastive else (0, 0)
            rows += _segment_rows(enc.hidden[i, sl], enc_n.hidden[i, sl] if contrastive else None,
                                  (start, end), n_span, segment, tokens)
            if not kept or kept[-1] != i:
                kept.append(i)
    if not rows:
        names = ", ".join(c.name for c in concepts)
        lengths = "/".join(str(s.length) for s in enc.segments)
        raise SubspaceError(f"concept(s) {names}: every prompt was truncated away by the tokenizer "
                            f"(max length {lengths}); shorten the templates or prompts")
    out = {CONTEXT: torch.cat(rows)}
    if enc.pooled is not None:
        pooled_rows: list[torch.Tensor] = []
        for i in kept:
            if tokens != "contrastive":
                pooled_rows.append(enc.pooled[i:i + 1])
            if contrastive:
                pooled_rows.append(enc.pooled[i:i + 1] - enc_n.pooled[i:i + 1])
        out[POOLED] = torch.cat(pooled_rows)
    return out
