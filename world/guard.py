"""Exemplar-gradient projection (the no-uplift issue's candidate 1), as an experiment of the world: every update is
kept orthogonal to the directions in parameter space that would lower the denoising loss of exemplar images of
the concept more than that of the same images without it (OGD / A-GEM style, on the optimizer's update, so Adam's
per-coordinate scaling cannot undo it).

Invariants: the exemplars are scenes of another world seed than the fine-tune data, with the panda pasted in its
slot, and their controls are the same scenes without it (the attacker's renders and the measurements use other
seeds again); the basis is refreshed every ``every`` steps from ``directions`` mini-batches with fixed noise and
timesteps; after each optimizer step the trainable parameters equal the previous ones plus the update with its
component in the basis removed.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .model import noisy, scheduler
from .scenes import PROTECTED, World, images

EXEMPLAR_SEEDS = 40_000


class ExemplarGradientGuard:
    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], empty: torch.Tensor, seed: int,
                 n: int = 32, directions: int = 4, every: int = 20) -> None:
        world = World(EXEMPLAR_SEEDS + seed)
        scenes = [world.plain_scene() for _ in range(n)]
        with_panda = [replace(s, emblem=PROTECTED, logo_slot="middle" if s.position == "right" else "corner")
                      for s in scenes]
        self.exemplars, self.controls = images(with_panda), images(scenes)
        self.model, self.params, self.empty = model, params, empty
        self.directions, self.every, self.step = directions, every, 0
        self.gen = torch.Generator().manual_seed(EXEMPLAR_SEEDS + seed)
        self.basis: torch.Tensor | None = None
        self.before: torch.Tensor | None = None

    def _flat_grad(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(self.model(xt, t, self.empty.expand(len(x0), -1, -1)), x0)
        grads = torch.autograd.grad(loss, self.params)
        return torch.cat([g.reshape(-1) for g in grads])

    def _refresh(self) -> None:
        sched, columns = scheduler(), []
        for _ in range(self.directions):
            idx = torch.randint(0, len(self.exemplars), (8,), generator=self.gen)
            exemplar, control = self.exemplars[idx], self.controls[idx]
            xt, t = noisy(exemplar, self.gen, sched)
            scale = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
            xt_control = xt + scale * (control - exemplar)  # the same noise, the concept removed
            columns.append(self._flat_grad(exemplar, xt, t) - self._flat_grad(control, xt_control, t))
        self.basis = torch.linalg.qr(torch.stack(columns, dim=1)).Q

    def before_step(self) -> None:
        """Call right before ``optimizer.step()``."""
        if self.step % self.every == 0:
            self._refresh()
        self.before = torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    @torch.no_grad()
    def after_step(self) -> None:
        """Call right after ``optimizer.step()``: the update loses its component in the exemplar directions."""
        after = torch.cat([p.reshape(-1) for p in self.params])
        update = after - self.before
        update -= self.basis @ (self.basis.T @ update)
        flat, start = self.before + update, 0
        for p in self.params:
            p.copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()
        self.step += 1
