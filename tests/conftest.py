"""Shared fixtures: tiny SD1- and SDXL-shaped components built from configs, saved with
``save_pretrained`` and loaded back through the same ``from_pretrained`` path a real checkpoint takes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from concept_exclusion.testing.tiny import clip_text_encoder, clip_tokenizer, unet_sd, unet_sdxl

from helpers import WORDS


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state; each test (like each real CLI process) starts from none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def sd(tmp_path_factory):
    """SD1-shaped: tokenizer, text encoder (32-d) and a UNet factory, all reloaded from disk."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny-sd")
    tok = clip_tokenizer(WORDS, root / "tokenizer")
    clip_text_encoder(len(tok), hidden_size=32).save_pretrained(root / "text_encoder")
    unet_sd(cross_attention_dim=32).save_pretrained(root / "unet")
    te = CLIPTextModel.from_pretrained(root / "text_encoder").eval().requires_grad_(False)

    def unet():
        return UNet2DConditionModel.from_pretrained(root / "unet")

    return SimpleNamespace(root=root, tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
                           text_encoder=te, unet=unet)


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory):
    """SDXL-shaped: two tokenizers/encoders (32-d each, the second with a projection), a UNet factory."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny-sdxl")
    tok1 = clip_tokenizer(WORDS, root / "tokenizer")
    tok2 = clip_tokenizer(WORDS, root / "tokenizer_2", pad_token="!")
    clip_text_encoder(len(tok1), hidden_size=32, seed=1).save_pretrained(root / "text_encoder")
    clip_text_encoder(len(tok2), hidden_size=32, projection_dim=32, seed=2).save_pretrained(root / "text_encoder_2")
    unet_sdxl(cross_attention_dim=64, pooled_dim=32).save_pretrained(root / "unet")
    te1 = CLIPTextModel.from_pretrained(root / "text_encoder").eval().requires_grad_(False)
    te2 = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2").eval().requires_grad_(False)

    def unet():
        return UNet2DConditionModel.from_pretrained(root / "unet")

    return SimpleNamespace(root=root, tokenizers=[CLIPTokenizer.from_pretrained(root / "tokenizer"),
                                                  CLIPTokenizer.from_pretrained(root / "tokenizer_2")],
                           text_encoders=[te1, te2], unet=unet)
