"""The world's base model as a trusted base for ``concept-exclusion audit --base world`` (registered under the
entry-point group ``concept_exclusion.audit_bases``).

Invariants: the weight check re-encodes presets with the world's own text encoder (MiniLM, its mask, ``MAX_TOKENS``
positions: the core's ``single`` family reads it as the world's ``Text.encode`` does); the behavioural check encodes
prompts through the encoder as it is (``Text.states``, uncached, so a file's text-encoder layers count) and its loss
is the world's training loss (x0 prediction on pixels, the cosine schedule).
"""

from __future__ import annotations

from typing import Sequence

import torch

from concept_exclusion.audit import BaseModel, Conditioning, base_model

from .base import Base, load_base
from .model import scheduler
from .scenes import SIZE


class WorldDenoising:
    """The world's denoiser seen as its training objective (a ``DenoisingBase``)."""

    resolution = SIZE
    multiple = None  # the world's images have one size
    device = torch.device("cpu")

    def __init__(self, base: Base) -> None:
        self.denoiser = base.model
        self.encoder = base.text.encoder
        self.text = base.text
        self.sched = scheduler()
        self.train_timesteps = int(self.sched.config.num_train_timesteps)

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        return Conditioning(self.text.states(list(prompts)))

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def loss_map(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: Conditioning
                 ) -> torch.Tensor:
        xt = self.sched.add_noise(latents, noise, t)
        return (self.denoiser(xt, t, cond.states) - latents).pow(2)

    def text_modules(self) -> dict[str, torch.nn.Module]:
        return {"lora_te_" + n.replace(".", "_"): m for n, m in self.encoder.named_modules() if n}


def load() -> BaseModel:
    """The world's shipped base model, with its text encoder and its training objective."""
    base = load_base(progress=False)
    return base_model("world", f"the evidence world's base model ({base.source})", [base.text.tokenizer],
                      [base.text.encoder], base.model, denoising=lambda clip_skip: WorldDenoising(base))
