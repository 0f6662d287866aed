"""Context projection: in training, the text states that reach the UNet lose their concept component.

Weight projection keeps ``W U`` of the key/value layers fixed, but the frozen base weights still
pass the concept's signal on, and every layer downstream (self-attention, feed-forward,
convolutions) may learn to read it. ``ContextProjector`` removes that signal at its source: a
forward pre-hook on every layer that reads the text encoder's states (cross-attention ``to_k`` /
``to_v``, SDXL's pooled ``add_embedding.linear_1`` columns) replaces its input ``x`` by
``x - (x U) U^T``.

Invariant: while attached, every forward pass of a module in training mode, or with gradients
enabled, reads projected text states, so no update can depend on the concept's directions;
a pass in eval mode without gradients (sampling, validation) sees the model unchanged, and
detaching restores the model exactly (nothing is written to the weights).
"""

from __future__ import annotations

import torch
from torch import nn

from concept_exclusion.hooks.base import Hook
from concept_exclusion.model.plan import Reader


def _projecting_hook(basis: torch.Tensor):
    on_device: dict[torch.device, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if not (module.training or torch.is_grad_enabled()):
            return None
        x = args[0] if args else kwargs["input"]
        u = on_device.get(x.device)
        if u is None:
            u = on_device.setdefault(x.device, basis.to(x.device, torch.float32))
        xf = x.float()
        y = (xf - (xf @ u) @ u.T).to(x.dtype)
        if args:
            return (y,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "input": y}

    return hook


class ContextProjector(Hook):
    """Forward pre-hooks that project the text states each reader receives (see module doc).

    ``readers`` is the plan's list (``concept_exclusion.model.plan.Reader``); it is read on every ``attach``, so
    re-encoding is: detach, rebase the plan (which updates the list in place), attach. Inert until ``attach``.
    """

    def __init__(self, readers: list[Reader]) -> None:
        super().__init__()
        self.readers = readers

    def _install(self) -> list:
        return [r.module.register_forward_pre_hook(_projecting_hook(r.basis), with_kwargs=True) for r in self.readers]
