"""What the behavioural check needs from a trusted base model: its text conditioning, its latents and its own
training loss.

A ``DenoisingBase`` is read-only to the check except through ``lora.apply.applied`` (which restores every weight
it changes). Implementations: ``behaviour.unet`` (SD1.x/2.x and SDXL folders and single files) and the bases that
packages register under the entry-point group ``concept_exclusion.audit_bases`` (``--base NAME``; the evidence
world registers ``world``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch


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
    resolution: int  # the image side, in pixels, the model is trained at
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
