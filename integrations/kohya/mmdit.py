"""sd-scripts' Flux and SD3 trainers (``flux_train_network.py``, ``sd3_train_network.py``) for the kohya wrapper.

Their tokenize strategies hold the tokenizers as ``clip_l`` / ``clip_g`` / ``t5xxl`` (not ``tokenizer1``), in the
order their text encoders arrive in ``create_network`` (Flux: CLIP-L, T5-XXL; SD3: CLIP-L, CLIP-G, T5-XXL), and
set T5's length (``t5xxl_max_length``: ``--t5xxl_max_token_length``). The concept is encoded with the same
tokenizers, encoders and T5 length as the captions.

The networks (``networks.lora_flux`` / ``networks.lora_sd3``) put LoRA on the joint blocks by default and
on the text readers (``txt_in``, ``vector_in``, ``context_embedder``, ``y_embedder``) only with
``in_dims`` / ``emb_dims``: without those, context projection on the model's readers carries the guarantee
(``concept_exclusion.model.mmdit``; the plan decides, as for any model).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MMDiTStrategy:
    """What sd-scripts' Flux/SD3 tokenize strategy says: tokenizers in encoder order and T5's sequence length."""

    tokenizers: list
    max_length: int | None


def mmdit_strategy(tokenize) -> MMDiTStrategy | None:
    """The Flux/SD3 reading of an sd-scripts tokenize strategy object, or None for an SD/SDXL one."""
    if tokenize is None or getattr(tokenize, "t5xxl", None) is None:
        return None
    toks = [t for t in (getattr(tokenize, "clip_l", None), getattr(tokenize, "clip_g", None), tokenize.t5xxl)
            if t is not None]
    length = getattr(tokenize, "t5xxl_max_length", None)
    return MMDiTStrategy(toks, int(length) if length is not None else None)
