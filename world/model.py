"""The world's denoiser: a small pixel-space diffusion transformer whose cross-attention carries diffusers' names.

Each block is diffusers' ``BasicTransformerBlock`` (``attn1`` self-attention, ``attn2`` cross-attention
with ``to_q/to_k/to_v/to_out.0``, ``ff``), so the plugin and PEFT target it exactly as a UNet's
transformer blocks. Inputs: images [n, 3, 32, 32] cut into 8x8 patches (16 tokens), the timestep,
and the text states [n, L, 384]; output: the predicted clean image (x0 / "sample" prediction: an 8x8x3 patch
is 192 numbers, more than the width, so predicting the noise would be bottlenecked), cosine schedule.
"""

from __future__ import annotations

import torch
from torch import nn

from .scenes import SIZE
from .text import WIDTH

CONFIG = dict(width=128, depth=4, heads=4, patch=8, text_width=WIDTH)


class Denoiser(nn.Module):
    def __init__(self, width: int = 128, depth: int = 4, heads: int = 4, patch: int = 8, text_width: int = WIDTH
                 ) -> None:
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        super().__init__()
        self.patch = patch
        self.grid = SIZE // patch
        self.patch_in = nn.Linear(3 * patch * patch, width)
        self.pos = nn.Parameter(torch.randn(1, self.grid * self.grid, width) * 0.02)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, width)
        self.blocks = nn.ModuleList([
            BasicTransformerBlock(width, heads, width // heads, cross_attention_dim=text_width, activation_fn="geglu")
            for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.patch_out = nn.Linear(width, 3 * patch * patch)
        nn.init.zeros_(self.patch_out.weight)
        nn.init.zeros_(self.patch_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, p, g = x.shape[0], self.patch, self.grid
        tokens = x.reshape(n, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3 * p * p)
        h = self.patch_in(tokens) + self.pos
        t = t.reshape(-1).expand(n) if t.numel() == 1 else t
        temb = self.time_embedding(self.time_proj(t).to(h.dtype))[:, None]
        for block in self.blocks:
            h = block(h + temb, encoder_hidden_states=context)
        out = self.patch_out(self.norm_out(h))
        return out.reshape(n, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, 3, SIZE, SIZE)


def new_denoiser(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(**CONFIG)


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                         clip_sample=True)


def noisy(x0: torch.Tensor, gen: torch.Generator, sched) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t) at uniformly drawn timesteps; the training target is ``x0`` itself."""
    t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return sched.add_noise(x0, noise, t), t
