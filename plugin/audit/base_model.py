"""A trusted base model as the audit reads it: tokenizers, frozen text encoders and denoiser, its layers by kohya
name (kohya/BFL spellings of the Flux/SD3 text readers, ``txt_in``, ``vector_in.in_layer``, ``y_embedder.mlp.0``,
found under diffusers' names), and, for the behavioural check, how to see it as its training objective.

Invariant: ``base_model`` is the one constructor, for folders, single files and registered bases alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from concept_exclusion.concept.encoders import TextEncoders, family_of, is_clip
from concept_exclusion.lora.file import sgm_to_diffusers

_DIT_ALIASES = {"lora_unet_txt_in": "lora_unet_context_embedder",
                "lora_unet_vector_in_in_layer": "lora_unet_time_text_embed_text_embedder_linear_1",
                "lora_unet_y_embedder_mlp_0": "lora_unet_time_text_embed_text_embedder_linear_1"}


@dataclass
class BaseModel:
    """Tokenizer(s), frozen text encoder(s) and denoiser of the trusted base, its layers by kohya name."""

    source: str
    kind: str  # "diffusers folder" | "single file"
    tokenizers: list
    encoders: list
    denoiser: torch.nn.Module  # UNet (SD1/2, SDXL) or transformer (Flux, SD3)
    modules: dict[str, torch.nn.Module]
    layers_per_block: int | None  # UNets only (SAI names)
    family: str  # encoders.FAMILIES name
    # builds the behavioural check's DenoisingBase for a clip_skip (None: not available for this base)
    denoising: Callable[[int | None], object] | None = None

    @property
    def depth(self) -> int:
        """Layers of the first CLIP encoder: the largest clip_skip that selects a layer (0: no CLIP reads states)."""
        clip = [e for e in self.encoders if is_clip(e)]
        return int(clip[0].config.num_hidden_layers) if clip else 0

    def text_encoders(self, clip_skip: int | None) -> TextEncoders:
        return TextEncoders(self.tokenizers, self.encoders, clip_skip, family=self.family)

    def module(self, key: str) -> torch.nn.Module | None:
        """The denoiser layer a kohya-spelled key names (diffusers, SAI or BFL paths)."""
        key = _DIT_ALIASES.get(key, key)
        found = self.modules.get(key)
        if found is None and self.layers_per_block is not None:
            found = self.modules.get(sgm_to_diffusers(key, self.layers_per_block))
        return found


def base_model(source: str, kind: str, tokenizers, encoders, denoiser: torch.nn.Module,
               denoising: Callable[[int | None], object] | None = None) -> BaseModel:
    """A ``BaseModel`` of these parts: the denoiser frozen in eval mode, its layers indexed by kohya name (the
    constructor a registered base uses too)."""
    net = denoiser.eval().requires_grad_(False)
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in net.named_modules() if n}
    config = getattr(net, "config", None)
    lpb = getattr(config, "layers_per_block", None) if config is not None else None
    lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
    return BaseModel(source, kind, list(tokenizers), list(encoders), net, modules, None if lpb is None else int(lpb),
                     family_of(encoders), denoising)
