"""Concept embeddings: the text-encoder states that carry a concept, as the UNet would read them.

``TextEncoders`` reproduces the conditioning a pipeline feeds its UNet (SD1.x/2.x: one CLIP
encoder, ``clip_skip`` in the kohya/A1111 sense; SDXL: both encoders' penultimate states
concatenated, plus the second encoder's pooled projection). ``concept_rows`` turns a preset's
concepts into the rows whose span the subspace must cover.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import SubspaceError
from .preset import Concept

CONTEXT = "context"
POOLED = "pooled"


@dataclass
class Encoded:
    """Encoder output for a batch of texts, float64 on the CPU: ``hidden`` [n, L, d], ``pooled`` [n, p] or None."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None


class TextEncoders:
    """The model's own tokenizer(s) and text encoder(s), read the way its UNet reads them.

    ``clip_skip`` follows kohya sd-scripts and A1111: 1 (or None) is the last layer, 2 the
    penultimate; diffusers' pipeline argument ``clip_skip=n`` equals ours ``n + 1``. SD1.x/2.x
    apply the final layer norm to a skipped layer's states; SDXL reads layer ``-clip_skip``
    (default 2) of both encoders without it, as its pipelines do.
    """

    def __init__(self, tokenizers: Sequence, encoders: Sequence, clip_skip: int | None = None,
                 dual: bool = False) -> None:
        if len(tokenizers) != len(encoders) or not encoders:
            raise SubspaceError(f"need one tokenizer per text encoder, got {len(tokenizers)} and {len(encoders)}")
        if clip_skip is not None and clip_skip < 1:
            raise SubspaceError(f"clip_skip must be 1 or more (1 = last layer), got {clip_skip}")
        self.tokenizers = list(tokenizers)
        self.encoders = list(encoders)
        self.dual = dual
        self.clip_skip = clip_skip if clip_skip is not None else (2 if dual else None)
        self.max_length = min(int(t.model_max_length) for t in self.tokenizers)

    @property
    def identity(self) -> str:
        """Class, name and a fingerprint of each encoder's token embeddings, joined by '+'."""
        parts = []
        for enc in self.encoders:
            table = enc.get_input_embeddings().weight.detach().float().cpu().contiguous()
            fp = hashlib.sha256(table.numpy().tobytes()).hexdigest()[:16]
            name = getattr(enc.config, "_name_or_path", "") or "unnamed"
            parts.append(f"{type(enc).__name__}:{name}:{enc.config.hidden_size}:{fp}")
        return "+".join(parts)

    def requires_grad(self) -> bool:
        return any(p.requires_grad for enc in self.encoders for p in enc.parameters())

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32) -> Encoded:
        hidden, pooled = [], []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            states, last_pooled = [], None
            for tok, enc in zip(self.tokenizers, self.encoders):
                device = next(enc.parameters()).device
                ids = tok(chunk, padding="max_length", max_length=self.max_length, truncation=True,
                          return_tensors="pt").input_ids.to(device)
                out = enc(ids, output_hidden_states=True)
                states.append(self._select(enc, out).double().cpu())
                last_pooled = getattr(out, "text_embeds", None)
                if last_pooled is None:
                    last_pooled = out.pooler_output
            hidden.append(torch.cat(states, dim=-1))
            pooled.append(last_pooled.double().cpu())
        return Encoded(torch.cat(hidden), torch.cat(pooled) if self.dual else None)

    def _select(self, enc, out) -> torch.Tensor:
        if self.dual:
            return out.hidden_states[-self.clip_skip]
        if self.clip_skip in (None, 1):
            return out.last_hidden_state
        text_model = getattr(enc, "text_model", enc)  # transformers 5 flattened CLIPTextModel
        return text_model.final_layer_norm(out.hidden_states[-self.clip_skip])

    def span(self, template: str, phrase: str) -> tuple[int, int]:
        """Token positions [start, end) that ``phrase`` occupies in ``template`` filled with it (after BOS)."""
        prefix = template.split("{}")[0]
        spans = set()
        for tok in self.tokenizers:
            n_prefix = len(tok(prefix, truncation=False).input_ids) - 1
            n_full = len(tok(prefix + phrase, truncation=False).input_ids) - 1
            spans.add((n_prefix, n_full))
        if len(spans) != 1:
            raise SubspaceError(f"the tokenizers split {template.replace('{}', phrase)!r} differently: {sorted(spans)}")
        start, end = spans.pop()
        return min(start, self.max_length), min(end, self.max_length)


def concept_rows(concepts: Sequence[Concept], encoders: TextEncoders, tokens: str) -> dict[str, torch.Tensor]:
    """Rows (float64) whose span must be protected, per embedding space ('context', and 'pooled' for SDXL).

    tokens: 'concept' = the concept's own positions; 'all' = those and every later position
    (CLIP is causal: later tokens, end-of-text and padding carry the concept too);
    'contrastive' = the same positions minus the prompt with the concept replaced by the neutral
    phrase, position by position (later positions aligned by their offset from the span's end);
    'contrastive+concept' = the contrastive rows and the concept's own positions.
    """
    items = [(tpl, p, neutral_text) for c in concepts for tpl, p, neutral_text in c.texts()]
    neutrals = [c.neutral for c in concepts for _ in c.texts()]
    texts = [tpl.replace("{}", p) for tpl, p, _ in items]
    enc = encoders.encode(texts)
    contrastive = tokens in ("contrastive", "contrastive+concept")
    enc_n = encoders.encode([n for _, _, n in items]) if contrastive else None
    L = encoders.max_length
    rows: list[torch.Tensor] = []
    pooled_rows: list[torch.Tensor] = []
    for i, (tpl, phrase, _) in enumerate(items):
        start, end = encoders.span(tpl, phrase)
        if start >= L - 1 or end <= start:
            continue  # the concept was truncated away (or tokenised to nothing) in this template
        h = enc.hidden[i]
        if tokens in ("concept", "contrastive+concept"):
            rows.append(h[start:end])
        if tokens == "all":
            rows.append(h[start:])
        if contrastive:
            n_start, n_end = encoders.span(tpl, neutrals[i])
            hn = enc_n.hidden[i]
            n_span = max(n_end - n_start, 1)
            span_idx = torch.tensor([n_start + min(k, n_span - 1) for k in range(end - start)])
            rows.append(h[start:end] - hn[span_idx.clamp(max=L - 1)])
            after = L - max(end, n_end)
            if after > 0:
                rows.append(h[end:end + after] - hn[n_end:n_end + after])
        if enc.pooled is not None:
            if tokens != "contrastive":
                pooled_rows.append(enc.pooled[i:i + 1])
            if contrastive:
                pooled_rows.append(enc.pooled[i:i + 1] - enc_n.pooled[i:i + 1])
    if not rows:
        names = ", ".join(c.name for c in concepts)
        raise SubspaceError(f"concept(s) {names}: every prompt was truncated away by the tokenizer "
                            f"(max length {L}); shorten the templates or prompts")
    out = {CONTEXT: torch.cat(rows)}
    if pooled_rows:
        out[POOLED] = torch.cat(pooled_rows)
    return out
