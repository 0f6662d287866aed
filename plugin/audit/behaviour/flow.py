"""Flux and SD3 bases as their training objective: rectified flow on the VAE's latents.

As diffusers' ``train_dreambooth_lora_flux.py`` / ``_sd3.py`` and sd-scripts train them: latents are
``(mean - shift_factor) * scaling_factor`` of the VAE's posterior (its mean, not a sample, so every file sees the
same latents); the noised input is ``(1 - sigma) x + sigma noise`` with the scheduler's training sigmas (SD3's
shifted, Flux's as configured); the target is the velocity ``noise - x``. Flux reads its latents packed 2x2 into
tokens with their position ids, the timestep as ``sigma`` and, where the model has a guidance embedding, the
guidance both trainers use by default (``GUIDANCE``); SD3 reads ``sigma * 1000``.

Invariant: ``loss_map`` is per latent element [n, c, h, w] (Flux's tokens unpacked back), so the image masks of
the check apply as for a UNet.
"""

from __future__ import annotations

from typing import Sequence

import torch

from concept_exclusion.audit.behaviour.denoising import Conditioning, text_modules
from concept_exclusion.concept.encoders import TextEncoders

GUIDANCE = 3.5  # --guidance_scale's default in train_dreambooth_lora_flux.py and flux_train_network.py
FLUX_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px through an 8x VAE


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[n, c, h, w] -> Flux tokens [n, h/2 * w/2, 4c] (each token a 2x2 patch, channels first)."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack`` for latents of side ``h`` x ``w``."""
    n, _, d = tokens.shape
    x = tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Flux's position ids of the packed tokens: [h/2 * w/2, 3] rows (0, row, column)."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


class FlowDenoising:
    """A ``DenoisingBase`` over a Flux or SD3 transformer, its VAE, its flow-matching scheduler and its encoders."""

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, scheduler, text: TextEncoders) -> None:
        self.denoiser, self.vae, self.text = transformer, vae.eval().requires_grad_(False), text
        self.device = next(transformer.parameters()).device
        self.flux = text.family.name == "flux"
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        config = transformer.config
        patch = int(getattr(config, "patch_size", 1) or 1)
        self.multiple = scale * (2 if self.flux else patch)
        self.resolution = scale * (FLUX_SAMPLE_SIZE if self.flux else int(config.sample_size))
        self.train_timesteps = int(scheduler.config.num_train_timesteps)
        # the scheduler's training sigmas, smallest first: timestep t (0 .. N-1) noises with sigma[t]
        self.sigmas = scheduler.sigmas.flip(0).to(self.device, torch.float32)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.scaling = float(vae.config.scaling_factor)
        self.guided = bool(getattr(config, "guidance_embeds", False))

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        with torch.no_grad():
            states, pooled = self.text.conditioning(list(prompts), device=self.device)
        dtype = self.denoiser.dtype
        return Conditioning(states.to(dtype), {"pooled_projections": pooled.to(dtype)})

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.vae.dtype)
        return (self.vae.encode(x).latent_dist.mean - self.shift) * self.scaling

    def loss_map(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: Conditioning
                 ) -> torch.Tensor:
        sigma = self.sigmas[t].view(-1, 1, 1, 1)
        noisy = ((1.0 - sigma) * latents.float() + sigma * noise.float()).to(self.denoiser.dtype)
        n, _, h, w = latents.shape
        pooled = cond.extra["pooled_projections"]
        if self.flux:
            kwargs = {"guidance": torch.full((n,), GUIDANCE, device=self.device)} if self.guided else {}
            txt_ids = torch.zeros(cond.states.shape[1], 3, device=self.device, dtype=noisy.dtype)
            out = self.denoiser(hidden_states=pack(noisy), timestep=sigma.flatten().to(noisy.dtype),
                                encoder_hidden_states=cond.states, pooled_projections=pooled, txt_ids=txt_ids,
                                img_ids=image_ids(h, w, self.device, noisy.dtype), **kwargs).sample
            pred = unpack(out, h, w)
        else:
            pred = self.denoiser(hidden_states=noisy, timestep=(sigma.flatten() * self.train_timesteps).to(noisy.dtype),
                                 encoder_hidden_states=cond.states, pooled_projections=pooled).sample
        return (pred.float() - (noise.float() - latents.float())).pow(2)

    def text_modules(self) -> dict[str, torch.nn.Module]:
        return text_modules(self.text)
