"""Tiny, randomly initialised diffusion components and an offline CLIP tokenizer.

They serve the tests, the demo and the benchmarks: nothing is downloaded. The tokenizer is
a real ``transformers.CLIPTokenizer`` read from files written here; every word given to
``write_clip_tokenizer`` becomes one token, anything else falls back to characters.
``sd_pipeline`` / ``sdxl_pipeline`` assemble them into whole diffusers pipelines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Stable Diffusion's training noise schedule (both tiny pipelines' schedulers)
SD_NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                     "beta_end": 0.012}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lower-case word: merge the lowest-ranked adjacent pair until none applies."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def write_clip_tokenizer(words: Iterable[str], folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for a CLIP BPE in which each of ``words`` is one token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    pending = sorted({w.lower() for w in words if w.strip()})
    for w in pending:
        if not w.isalpha() or not w.isascii():
            raise ValueError(f"tokenizer words must be ASCII letters only, got {w!r}")
    while pending:
        still = []
        for w in pending:
            pieces = _bpe(w, ranks)
            if len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                    vocab_list.append(pair[0] + pair[1])
                still.append(w)
        pending = still
    vocab_list += list(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def clip_tokenizer(words: Iterable[str], folder: str | Path, max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A ``CLIPTokenizer`` over ``words``, saved in ``folder`` with ``save_pretrained`` and loaded back."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer(words, folder)
    folder = Path(folder)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token=pad_token)
    tok.save_pretrained(str(folder))
    return CLIPTokenizer.from_pretrained(str(folder))


def clip_text_encoder(vocab_size: int, hidden_size: int = 32, layers: int = 2, heads: int = 4,
                      projection_dim: int | None = None, max_positions: int = 77, seed: int = 0):
    """A tiny CLIP text encoder (with a projection head when ``projection_dim`` is set, as SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions,
        projection_dim=projection_dim or hidden_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval().requires_grad_(False)


def unet_sd(cross_attention_dim: int = 32, sample_size: int = 8, channels: tuple[int, ...] = (32, 64),
            head_dim: int = 8, in_channels: int = 4, seed: int = 0):
    """A tiny SD1/SD2-shaped ``UNet2DConditionModel`` (cross-attention in every block but the last down/first up)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=channels, layers_per_block=1, norm_num_groups=min(32, channels[0]),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim, attention_head_dim=head_dim,
    )


def unet_sdxl(cross_attention_dim: int = 64, pooled_dim: int = 32, sample_size: int = 8,
              channels: tuple[int, ...] = (32, 64), head_dim: int = 8, time_embed_dim: int = 8, seed: int = 0):
    """A tiny SDXL-shaped ``UNet2DConditionModel``: text_time additional embedding fed by the pooled embedding."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=1, norm_num_groups=min(32, channels[0]),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim, attention_head_dim=head_dim,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim,
        transformer_layers_per_block=1, use_linear_projection=True,
    )


def tiny_vae(seed: int = 0):
    """A 3-level ``AutoencoderKL``: 32x32 images <-> 4x8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4,
                         norm_num_groups=4, layers_per_block=1, sample_size=32)


def sd_pipeline(words: Iterable[str], folder: str | Path):
    """A tiny SD1-shaped ``StableDiffusionPipeline`` (32-d text, DDPM scheduler, no safety checker).

    Its tokenizer's files are written to ``folder/tokenizer-src``; save the pipeline with ``save_pretrained``.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    tok = clip_tokenizer(words, Path(folder) / "tokenizer-src")
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok), hidden_size=32), tokenizer=tok,
        unet=unet_sd(cross_attention_dim=32), scheduler=DDPMScheduler(**SD_NOISE_SCHEDULE, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdxl_pipeline(words: Iterable[str], folder: str | Path):
    """A tiny SDXL-shaped ``StableDiffusionXLPipeline`` (two 32-d text encoders, the second with a projection
    feeding the 32-d pooled embedding; 64-d cross-attention; Euler scheduler).

    Its tokenizers' files are written to ``folder/tokenizer-src`` and ``folder/tokenizer-2-src``; save the
    pipeline with ``save_pretrained``.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok1 = clip_tokenizer(words, Path(folder) / "tokenizer-src")
    tok2 = clip_tokenizer(words, Path(folder) / "tokenizer-2-src", pad_token="!")
    return StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok1), hidden_size=32, seed=1),
        text_encoder_2=clip_text_encoder(len(tok2), hidden_size=32, projection_dim=32, seed=2),
        tokenizer=tok1, tokenizer_2=tok2, unet=unet_sdxl(cross_attention_dim=64, pooled_dim=32),
        scheduler=EulerDiscreteScheduler(**SD_NOISE_SCHEDULE))


def clipseg_folder(words: Iterable[str], folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny random CLIPSeg (``CLIPSegForImageSegmentation`` and its processor) written to ``folder`` with
    ``save_pretrained``, as a downloaded segmenter would be: load it back with ``from_pretrained``."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    folder = Path(folder)
    tok = clip_tokenizer(words, folder / "tokenizer-src")
    torch.manual_seed(seed)
    config = CLIPSegConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=16, reduce_dim=8, extract_layers=[1], decoder_num_attention_heads=2,
        decoder_intermediate_size=16)
    CLIPSegForImageSegmentation(config).save_pretrained(str(folder))
    images = ViTImageProcessor(size={"height": image_size, "width": image_size}, do_normalize=True,
                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    CLIPSegProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(folder))
    return folder
