"""A model family's text encoders, read the way its denoiser reads them (one path for training and concepts).

``TextEncoders.conditioning`` gives the text states and pooled embedding a pipeline feeds its
UNet or transformer; ``TextEncoders.encode`` gives the same computed in float32 (whatever dtype the
weights are kept in), float64 on the CPU, with the sequence segments ``concept_rows`` needs. Families (``FAMILIES``):

- ``single``: one encoder (SD1.x/2.x CLIP; or one BERT/T5-style encoder);
- ``sdxl``: CLIP-L and CLIP-G layer ``-clip_skip`` (default 2) concatenated, pooled from CLIP-G;
- ``flux``: T5 states; pooled from CLIP (``pooler_output``);
- ``sd3``: CLIP-L ++ CLIP-G penultimate states zero-padded to T5's width, then T5's states along
  the sequence; pooled CLIP-L ++ CLIP-G.

Invariants: CLIP (causal) encoders run without an attention mask, as Stable Diffusion pipelines
run them; every other (bidirectional: BERT, T5) encoder gets the tokenizer's attention mask, on
every path. ``clip_skip`` follows kohya/A1111 (1 or None = last layer, 2 = penultimate) and
applies to CLIP encoders only; SD1.x/2.x apply the final layer norm to a skipped layer's states.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from concept_exclusion.concept.precision import float32_compute
from concept_exclusion.errors import SubspaceError

CONTEXT = "context"
POOLED = "pooled"


@dataclass(frozen=True)
class Family:
    """How a family reads its encoders (indices into the tokenizer/encoder lists).

    ``context``: segments joined along the sequence; each segment concatenates its encoders' states
    along features and is zero-padded on the right to the widest segment. ``pooled``: encoders whose
    pooled outputs are concatenated (empty: no pooled basis). ``clip_skip``: the default layer.
    ``skip_norm``: a skipped CLIP layer goes through the final layer norm.
    """

    name: str
    count: int
    context: tuple[tuple[int, ...], ...]
    pooled: tuple[int, ...]
    clip_skip: int | None
    skip_norm: bool


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("single", 1, ((0,),), (), None, True),
    Family("sdxl", 2, ((0, 1),), (1,), 2, False),
    Family("flux", 2, ((1,),), (0,), None, False),
    Family("sd3", 3, ((0, 1), (2,)), (0, 1), 2, False),
)}


def is_clip(encoder) -> bool:
    """A CLIP text encoder (causal attention): its config's model type starts with 'clip'."""
    return str(getattr(getattr(encoder, "config", None), "model_type", "")).startswith("clip")


def family_of(encoders: Sequence) -> str:
    """The family a list of encoders in pipeline order belongs to: 1 -> single, 2 -> sdxl or flux
    (a second encoder that is not CLIP), 3 -> sd3."""
    if len(encoders) == 1:
        return "single"
    if len(encoders) == 2:
        return "sdxl" if is_clip(encoders[1]) else "flux"
    if len(encoders) == 3:
        return "sd3"
    raise SubspaceError(f"expected 1 (SD1/2), 2 (SDXL, Flux) or 3 (SD3) text encoders, got {len(encoders)}")


@dataclass(frozen=True)
class Segment:
    """Positions [start, start + length) of the joined sequence, produced by ``tokenizers`` (which must split
    texts alike); ``causal``: every encoder in it is CLIP."""

    start: int
    length: int
    tokenizers: tuple
    causal: bool


@dataclass
class Encoded:
    """Encoder output for a batch of texts, float64 on the CPU: ``hidden`` [n, L, d], ``pooled`` [n, p] or None."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None
    segments: tuple[Segment, ...] = ()


class TextEncoders:
    """The model's own tokenizer(s) and text encoder(s), in pipeline order, read as its denoiser reads them.

    ``family``: a ``FAMILIES`` name (default: guessed from the encoders, ``family_of``).
    ``max_length``: sequence length of the non-CLIP encoders (default: their tokenizer's
    ``model_max_length``; Flux pipelines use 512, SD3 256).
    """

    def __init__(self, tokenizers: Sequence, encoders: Sequence, clip_skip: int | None = None,
                 family: str | None = None, max_length: int | None = None) -> None:
        if len(tokenizers) != len(encoders) or not encoders:
            raise SubspaceError(f"need one tokenizer per text encoder, got {len(tokenizers)} and {len(encoders)}")
        if clip_skip is not None and clip_skip < 1:
            raise SubspaceError(f"clip_skip must be 1 or more (1 = last layer), got {clip_skip}")
        name = family or family_of(encoders)
        if name not in FAMILIES:
            raise SubspaceError(f"unknown text-encoder family {name!r} (known: {', '.join(FAMILIES)})")
        self.family = FAMILIES[name]
        if self.family.count != len(encoders):
            raise SubspaceError(f"the {name} family has {self.family.count} text encoder(s), got {len(encoders)}")
        self.tokenizers = list(tokenizers)
        self.encoders = list(encoders)
        readers = [i for seg in self.family.context for i in seg]
        self.clip_skip = clip_skip if clip_skip is not None else self.family.clip_skip
        if self.clip_skip is None and all(is_clip(self.encoders[i]) for i in readers):
            self.clip_skip = 1  # the last layer, stated: files record the layer their concept was read at
        if self.clip_skip not in (None, 1) and not any(is_clip(self.encoders[i]) for i in readers):
            raise SubspaceError(f"clip_skip={self.clip_skip} applies to CLIP encoders only; this model's text "
                                f"states come from {type(self.encoders[readers[0]]).__name__}")
        self.segments: tuple[Segment, ...] = ()
        start = 0
        for seg in self.family.context:
            length = min(self._natural_length(i, max_length) for i in seg)
            causal = all(is_clip(self.encoders[i]) for i in seg)
            self.segments += (Segment(start, length, tuple(self.tokenizers[i] for i in seg), causal),)
            start += length
        # each encoder is tokenised to its segment's length; a pooled-only encoder (Flux's CLIP) to its own
        self._lengths = [self._natural_length(i, max_length) for i in range(len(encoders))]
        for seg, segment in zip(self.family.context, self.segments):
            for i in seg:
                self._lengths[i] = segment.length
        self.max_length = self.segments[0].length

    @property
    def sequence_length(self) -> int | None:
        """The length the T5/BERT encoder's states are read at (None: every encoder is CLIP, always 77)."""
        lengths = [n for n, enc in zip(self._lengths, self.encoders) if not is_clip(enc)]
        return lengths[0] if lengths else None

    def _natural_length(self, i: int, override: int | None) -> int:
        if override is not None and not is_clip(self.encoders[i]):
            return int(override)
        return int(self.tokenizers[i].model_max_length)

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

    # the one encoding path ---------------------------------------------------------------------
    def _run(self, i: int, texts: list[str], device) -> object:
        tok, enc = self.tokenizers[i], self.encoders[i]
        dev = device if device is not None else next(enc.parameters()).device
        batch = tok(texts, padding="max_length", max_length=self._lengths[i], truncation=True, return_tensors="pt")
        if is_clip(enc):
            return enc(batch.input_ids.to(dev), output_hidden_states=True)
        return enc(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                   output_hidden_states=True)

    def _states(self, enc, out) -> torch.Tensor:
        if not is_clip(enc) or self.clip_skip in (None, 1) and self.family.skip_norm:
            return out.last_hidden_state
        if not self.family.skip_norm:
            return out.hidden_states[-self.clip_skip]
        text_model = getattr(enc, "text_model", enc)  # transformers 5 flattened CLIPTextModel
        return text_model.final_layer_norm(out.hidden_states[-self.clip_skip])

    @staticmethod
    def _pooled(enc, out) -> torch.Tensor:
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise SubspaceError(f"{type(enc).__name__} gives no pooled output (text_embeds or pooler_output)")
        return pooled

    def conditioning(self, texts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(text states [n, L, d], pooled [n, p] or None) as the denoiser reads them, in the encoders' dtype.

        Gradients flow when enabled (a text encoder that trains); ``device``: where the inputs go
        (default: each encoder's own device).
        """
        texts = list(texts)
        needed = sorted({i for seg in self.family.context for i in seg} | set(self.family.pooled))
        outs = {i: self._run(i, texts, device) for i in needed}
        parts = [torch.cat([self._states(self.encoders[i], outs[i]) for i in seg], dim=-1)
                 for seg in self.family.context]
        width = max(p.shape[-1] for p in parts)
        hidden = torch.cat([F.pad(p, (0, width - p.shape[-1])) for p in parts], dim=1)
        pooled = None
        if self.family.pooled:
            pooled = torch.cat([self._pooled(self.encoders[i], outs[i]) for i in self.family.pooled], dim=-1)
        return hidden, pooled

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32) -> Encoded:
        """``conditioning`` in batches, computed in float32 whatever the encoders' dtype (``float32_compute``: the
        same weights give the same rows in a bf16 trainer and a float32 audit), returned float64 on the CPU, with
        the segments of the sequence."""
        hidden, pooled = [], []
        with contextlib.ExitStack() as stack:
            for enc in self.encoders:
                stack.enter_context(float32_compute(enc))
            for i in range(0, len(texts), batch_size):
                h, p = self.conditioning(texts[i:i + batch_size])
                hidden.append(h.double().cpu())
                if p is not None:
                    pooled.append(p.double().cpu())
        return Encoded(torch.cat(hidden), torch.cat(pooled) if pooled else None, self.segments)

    def span(self, template: str, phrase: str, segment: Segment | None = None) -> tuple[int, int]:
        """Token positions [start, end) that ``phrase`` occupies in ``template`` filled with it, within
        ``segment`` (default: the first), counting the tokenizer's start token if it has one."""
        segment = segment or self.segments[0]
        prefix = template.split("{}")[0]
        spans = set()
        for tok in segment.tokenizers:
            # every tokenizer here adds exactly one end token; the start token (CLIP, BERT) counts as a position
            n_prefix = len(tok(prefix.rstrip(), truncation=False).input_ids) - 1
            n_full = len(tok(prefix + phrase, truncation=False).input_ids) - 1
            spans.add((n_prefix, n_full))
        if len(spans) != 1:
            raise SubspaceError(f"the tokenizers split {template.replace('{}', phrase)!r} differently: {sorted(spans)}")
        start, end = spans.pop()
        return min(start, segment.length), min(end, segment.length)
