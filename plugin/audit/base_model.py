"""A trusted base model as the audit reads it: tokenizers, frozen text encoders and denoiser, its layers by kohya
name (SAI names of SD1/2/XL UNets, kohya/BFL/SAI names of Flux and SD3 layers through ``dit_names``, found under
diffusers' names), and, for the behavioural check, how to see it as its training objective.

Invariant: ``base_model`` is the one constructor, for folders, single files and registered bases alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from concept_exclusion.audit.dit_names import SWAPPED_HALVES, diffusers_paths
from concept_exclusion.concept.encoders import TextEncoders, family_of, is_clip
from concept_exclusion.errors import AuditError
from concept_exclusion.lora.file import sgm_to_diffusers


@dataclass(frozen=True)
class Part:
    """A denoiser layer that holds some rows of a named layer's weight (``swapped``: its two halves in the other
    order, ``dit_names.SWAPPED_HALVES``)."""

    module: torch.nn.Module
    swapped: bool = False


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
    sequence_length: int | None = None  # the T5/BERT length prompts are read at (None: the tokenizer's own)
    # reads one layer's weights into a denoiser built without them (None: the denoiser is loaded whole)
    fill: Callable[[torch.nn.Module], None] | None = None

    @property
    def depth(self) -> int:
        """Layers of the first CLIP encoder: the largest clip_skip that selects a layer (0: no CLIP reads states)."""
        clip = [e for e in self.encoders if is_clip(e)]
        return int(clip[0].config.num_hidden_layers) if clip else 0

    def text_encoders(self, clip_skip: int | None) -> TextEncoders:
        return TextEncoders(self.tokenizers, self.encoders, clip_skip, family=self.family,
                            max_length=self.sequence_length)

    def read_at(self, sequence_length: int | None) -> int | None:
        """Read prompts at this T5/BERT length from now on (None: the tokenizer's own); returns the length read at
        (None: every encoder is CLIP). ``AuditError`` for a length asked of a base whose encoders are all CLIP."""
        natural = self.text_encoders(None).sequence_length
        if sequence_length is not None and natural is None:
            raise AuditError(f"--max-sequence-length {sequence_length}: this base's text encoders are all CLIP "
                             f"(77 tokens); the length applies to T5/BERT encoders (Flux, SD3)")
        self.sequence_length = sequence_length
        return natural if sequence_length is None else sequence_length

    def module(self, key: str) -> torch.nn.Module | None:
        """The denoiser layer a kohya-spelled key names (diffusers, SAI or BFL paths; None for a BFL/SAI layer that
        diffusers splits in several: see ``parts``)."""
        found = self.parts(key)
        return found[0].module if found is not None and len(found) == 1 else None

    def load(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` (a denoiser layer) with its weights in memory: read from the checkpoint now when the denoiser
        was built without them."""
        if self.fill is not None:
            self.fill(module)
        return module

    def use_denoiser(self, denoiser: torch.nn.Module) -> None:
        """Put the whole denoiser (weights loaded) in place of one built without them."""
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.modules, self.fill = index_modules(self.denoiser), None

    def parts(self, key: str) -> list[Part] | None:
        """The denoiser layers whose weights stack (rows, in order) into the layer a kohya-spelled key names: one
        for most names, several for a BFL/SAI fused layer (``qkv``, Flux's ``linear1``); None if any is missing."""
        found = self.modules.get(key)
        if found is None and self.layers_per_block is not None:
            found = self.modules.get(sgm_to_diffusers(key, self.layers_per_block))
        if found is not None:
            return [Part(found)]
        paths = diffusers_paths(key)
        if paths is None:
            return None
        parts = []
        for path in paths:
            module = self.modules.get("lora_unet_" + path.replace(".", "_"))
            if module is None:
                return None
            parent = self.modules.get("lora_unet_" + path.rpartition(".")[0].replace(".", "_"))
            parts.append(Part(module, type(parent).__name__ in SWAPPED_HALVES))
        return parts


def index_modules(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """A denoiser's layers by kohya name (``lora_unet_`` + the diffusers path with ``_``)."""
    return {"lora_unet_" + n.replace(".", "_"): m for n, m in net.named_modules() if n}


def base_model(source: str, kind: str, tokenizers, encoders, denoiser: torch.nn.Module,
               denoising: Callable[[int | None], object] | None = None) -> BaseModel:
    """A ``BaseModel`` of these parts: the denoiser frozen in eval mode, its layers indexed by kohya name (the
    constructor a registered base uses too)."""
    net = denoiser.eval().requires_grad_(False)
    modules = index_modules(net)
    config = getattr(net, "config", None)
    lpb = getattr(config, "layers_per_block", None) if config is not None else None
    lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
    return BaseModel(source, kind, list(tokenizers), list(encoders), net, modules, None if lpb is None else int(lpb),
                     family_of(encoders), denoising)
