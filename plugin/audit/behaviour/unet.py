"""SD1.x/2.x and SDXL bases as their training objective: the VAE's latents, the scheduler's noise and prediction
type (epsilon, v or sample), the UNet.

Invariants: latents are the VAE's posterior mean times its scaling factor (no sampling, so every file sees the
same latents); SDXL reads its pooled embedding and size ids for a square image at the model's resolution, no
crop; everything is read from safetensors, offline, like the rest of the base.
"""

from __future__ import annotations

from typing import Sequence

import torch

from concept_exclusion.audit.behaviour.denoising import Conditioning, text_modules
from concept_exclusion.concept.encoders import TextEncoders


class UNetDenoising:
    """A ``DenoisingBase`` over a UNet, its VAE, its scheduler and its text encoders (read at ``clip_skip``)."""

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module, scheduler, text: TextEncoders) -> None:
        self.denoiser, self.vae, self.sched, self.text = unet, vae.eval().requires_grad_(False), scheduler, text
        self.device = next(unet.parameters()).device
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(unet.config.sample_size) * scale
        self.multiple = scale * 2 ** (len(unet.config.block_out_channels) - 1)  # the UNet halves it per level
        self.train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction = scheduler.config.prediction_type
        self.sdxl = text.family.name == "sdxl"

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        with torch.no_grad():
            states, pooled = self.text.conditioning(list(prompts), device=self.device)
        extra = {}
        if self.sdxl:
            r = self.resolution
            ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=states.dtype, device=self.device)
            extra = {"text_embeds": pooled, "time_ids": ids.expand(len(prompts), -1)}
        return Conditioning(states.to(self.denoiser.dtype), extra)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def loss_map(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: Conditioning
                 ) -> torch.Tensor:
        noisy = self.sched.add_noise(latents, noise, t)
        kwargs = {"added_cond_kwargs": cond.extra} if self.sdxl else {}
        pred = self.denoiser(noisy, t, encoder_hidden_states=cond.states, **kwargs).sample
        if self.prediction == "epsilon":
            target = noise
        elif self.prediction == "v_prediction":
            target = self.sched.get_velocity(latents, noise, t)
        else:
            target = latents
        return (pred.float() - target.float()).pow(2)

    def text_modules(self) -> dict[str, torch.nn.Module]:
        return text_modules(self.text)
