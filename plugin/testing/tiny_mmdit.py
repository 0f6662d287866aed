"""Tiny, randomly initialised MMDiT components (Flux, SD3) and an offline T5 tokenizer.

For the tests and the benchmarks: nothing is downloaded. Shapes keep the real models' wiring
(Flux: ``context_embedder`` reads T5 states of width ``joint_attention_dim``,
``time_text_embed.text_embedder`` the CLIP pooled vector; SD3: CLIP-L ++ CLIP-G penultimate states
zero-padded to T5's width, pooled CLIP-L ++ CLIP-G), at a few dozen channels. Every builder is
seeded, so two calls with the same arguments give the same weights.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable

import torch

from concept_exclusion.testing.tiny import clip_text_encoder, clip_tokenizer

T5_SPECIALS = ("<pad>", "</s>", "<unk>")
# Flux.1 / SD3 VAE latent statistics (their vae/config.json); any values work for random weights
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}


def t5_tokenizer(words: Iterable[str], folder: str | Path, max_length: int = 512):
    """A real ``T5TokenizerFast`` (SentencePiece-style unigram) in which each of ``words`` is one token.

    Other text falls back to single letters. It ends every sequence with ``</s>`` and pads with
    ``<pad>`` (id 0), as T5 does; saved in ``folder`` and loaded back from there.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [(tok, 0.0) for tok in T5_SPECIALS]
    seen = {tok for tok, _ in pieces}
    for w in sorted({w.lower() for w in words if w.strip()}):
        if not w.isalpha() or not w.isascii():
            raise ValueError(f"tokenizer words must be ASCII letters only, got {w!r}")
        pieces.append(("\u2581" + w, -1.0))
        seen.add("\u2581" + w)
    pieces.append(("\u2581", -5.0))
    pieces += [(c, -10.0) for c in string.ascii_lowercase + string.digits if c not in seen]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                          extra_ids=0, model_max_length=max_length)
    tok.save_pretrained(str(folder))
    return T5TokenizerFast.from_pretrained(str(folder))


def t5_encoder(vocab_size: int, d_model: int = 48, layers: int = 2, heads: int = 4, seed: int = 0):
    """A tiny ``T5EncoderModel`` (bidirectional, relative positions, gated-GELU feed-forward as T5 v1.1)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=d_model * 2,
                      num_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval().requires_grad_(False)


def flux_transformer(joint_attention_dim: int = 48, pooled_projection_dim: int = 32, layers: int = 1,
                     single_layers: int = 1, heads: int = 2, head_dim: int = 16, in_channels: int = 16,
                     guidance_embeds: bool = False, seed: int = 0):
    """A tiny ``FluxTransformer2DModel`` (``in_channels`` = 4 x the VAE's latent channels: 2x2 packing)."""
    from diffusers import FluxTransformer2DModel

    rope = (head_dim // 4, head_dim // 4, head_dim - 2 * (head_dim // 4))
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds, axes_dims_rope=rope)


def sd3_transformer(joint_attention_dim: int = 48, pooled_projection_dim: int = 40, layers: int = 2,
                    heads: int = 4, head_dim: int = 8, in_channels: int = 4, sample_size: int = 8,
                    dual_attention_layers: tuple[int, ...] = (), seed: int = 0):
    """A tiny ``SD3Transformer2DModel`` (patch 1, caption projection to the inner width; SD3.5-style
    ``dual_attention_layers`` add an image self-attention ``attn2`` to those blocks)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=in_channels, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_attention_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_projection_dim,
        out_channels=in_channels, pos_embed_max_size=sample_size * 2, dual_attention_layers=dual_attention_layers)


def mmdit_vae(latent_channels: int, factors: dict[str, float], seed: int = 0):
    """A 2-level ``AutoencoderKL`` (16x16 images <-> 8x8 latents) with the family's scaling/shift factors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                         latent_channels=latent_channels, norm_num_groups=4, layers_per_block=1, sample_size=16,
                         use_quant_conv=False, use_post_quant_conv=False, **factors)


def flux_pipeline(words: Iterable[str], folder: str | Path, clip_width: int = 32, t5_width: int = 48):
    """A tiny ``FluxPipeline``: CLIP-L-shaped pooled encoder (``clip_width``), T5 (``t5_width``), 4-channel VAE.

    Tokenizer files go to ``folder/tokenizer-src`` and ``folder/tokenizer-2-src``; save the
    pipeline with ``save_pretrained`` and reload it with ``FluxPipeline.from_pretrained``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    words = list(words)
    tok = clip_tokenizer(words, Path(folder) / "tokenizer-src")
    tok_2 = t5_tokenizer(words, Path(folder) / "tokenizer-2-src")
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=mmdit_vae(4, FLUX_VAE_FACTORS),
        text_encoder=clip_text_encoder(len(tok), hidden_size=clip_width, seed=1), tokenizer=tok,
        text_encoder_2=t5_encoder(len(tok_2), d_model=t5_width, seed=2), tokenizer_2=tok_2,
        transformer=flux_transformer(joint_attention_dim=t5_width, pooled_projection_dim=clip_width, in_channels=16))


def sd3_pipeline(words: Iterable[str], folder: str | Path, clip_widths: tuple[int, int] = (16, 24),
                 t5_width: int = 48):
    """A tiny ``StableDiffusion3Pipeline``: CLIP-L/CLIP-G-shaped encoders with projections (pooled
    ``sum(clip_widths)``), their penultimate states zero-padded to ``t5_width`` and joined with T5's.

    Tokenizer files go to ``folder/tokenizer{,-2,-3}-src``; save with ``save_pretrained``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    if sum(clip_widths) > t5_width:
        raise ValueError(f"the CLIP states ({sum(clip_widths)} wide together) must fit in T5's width {t5_width}")
    words = list(words)
    tok = clip_tokenizer(words, Path(folder) / "tokenizer-src")
    tok_2 = clip_tokenizer(words, Path(folder) / "tokenizer-2-src", pad_token="!")
    tok_3 = t5_tokenizer(words, Path(folder) / "tokenizer-3-src")
    l_width, g_width = clip_widths
    return StableDiffusion3Pipeline(
        transformer=sd3_transformer(joint_attention_dim=t5_width, pooled_projection_dim=l_width + g_width),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=mmdit_vae(4, SD3_VAE_FACTORS),
        text_encoder=clip_text_encoder(len(tok), hidden_size=l_width, projection_dim=l_width, seed=1),
        tokenizer=tok,
        text_encoder_2=clip_text_encoder(len(tok_2), hidden_size=g_width, projection_dim=g_width, seed=2),
        tokenizer_2=tok_2, text_encoder_3=t5_encoder(len(tok_3), d_model=t5_width, seed=3), tokenizer_3=tok_3)
