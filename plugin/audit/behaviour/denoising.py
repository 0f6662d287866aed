"""What the behavioural check needs from a trusted base model: its text conditioning, its latents and its own
training loss.

A ``DenoisingBase`` is read-only to the check except through ``lora.apply.applied`` (which restores every weight
it changes). Implementations: ``behaviour.unet`` (SD1.x/2.x and SDXL folders and single files), ``behaviour.flow``
(Flux and SD3 folders) and the bases that
packages register under the entry-point group ``concept_exclusion.audit_bases`` (``--base NAME``; the evidence
world registers ``world``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from concept_exclusion.concept.encoders import TextEncoders


@dataclass
class Conditioning:
    """What the denoiser reads from a batch of prompts: text ``states`` [n, L, d] (what an inversion attack
    optimises) and anything else per sample (``extra``: SDXL's pooled embedding and size ids), held fixed."""

    states: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.states.shape[0])

    def take(self, index: torch.Tensor) -> "Conditioning":
        return Conditioning(self.states[index], {k: v[index] for k, v in self.extra.items()})

    def with_states(self, states: torch.Tensor) -> "Conditioning":
        """The same extra inputs (the first sample's, repeated) with other text states."""
        n = states.shape[0]
        return Conditioning(states, {k: v[:1].expand(n, *v.shape[1:]) for k, v in self.extra.items()})


class DenoisingBase(Protocol):
    """A trusted base model seen as its training objective.

    Invariant: ``loss_map(latents(x), noise, t, encode(p))`` is, per element, the loss the model was trained
    with (its prediction type and schedule), so a LoRA that lowers it for an image has learned to produce it."""

    denoiser: torch.nn.Module
    # the image side, in pixels, the check runs at: the one the model trains at unless set before the first call
    # (to a multiple of ``multiple``; None: the model runs at ``resolution`` only)
    resolution: int
    multiple: int | None
    train_timesteps: int
    device: torch.device

    def encode(self, prompts: Sequence[str]) -> Conditioning: ...

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images [n, 3, H, W] in [-1, 1] at ``resolution`` -> what the denoiser denoises."""

    def loss_map(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: Conditioning
                 ) -> torch.Tensor:
        """Per-element squared error [n, c, h, w] of the model's prediction at timesteps ``t`` [n]."""

    def text_modules(self) -> dict[str, torch.nn.Module]:
        """The text encoders' layers under their kohya names (``lora_te_...``, ``lora_te1_``/``lora_te2_``)."""


# the kohya prefixes that name each encoder of a family, in pipeline order: sd-scripts' own (SDXL te1/te2, Flux
# te1/te3, SD3 te1/te2/te3) and the diffusers spellings read as kohya's (``text_encoder.`` -> lora_te_,
# ``text_encoder_2.`` -> lora_te2_, ``text_encoder_3.`` -> lora_te3_)
_PREFIXES = {"single": (("lora_te_", "lora_te1_"),),
             "sdxl": (("lora_te1_", "lora_te_"), ("lora_te2_",)),
             "flux": (("lora_te1_", "lora_te_"), ("lora_te3_", "lora_te2_")),
             "sd3": (("lora_te1_", "lora_te_"), ("lora_te2_",), ("lora_te3_",))}


def text_modules(text: TextEncoders) -> dict[str, torch.nn.Module]:
    """Every layer of ``text``'s encoders under each kohya name a LoRA file may give it."""
    out = {}
    for prefixes, encoder in zip(_PREFIXES[text.family.name], text.encoders):
        for name, module in encoder.named_modules():
            if not name:
                continue
            # transformers 5 may drop CLIPTextModel's ``text_model`` level; files keep it
            paths = [name] if name.startswith("text_model.") else [name, "text_model." + name]
            for prefix in prefixes:
                for path in paths:
                    out[prefix + path.replace(".", "_")] = module
    return out
