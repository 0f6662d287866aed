"""Projection of gradients and weights away from the concept subspace.

``GradientProjector`` installs one tensor hook per constrained parameter. A tensor hook runs on
each micro-batch's gradient before it is accumulated into ``.grad``, before DDP's reduction
and before any clipping; the projection is linear, so accumulation, loss scaling and averaging
across ranks commute with it. It computes in float32 on the gradient's device, never reads a
value back to the host, and leaves non-finite entries where they were without spreading them.

``WeightProjector`` does exact mode's post-step work: it puts every constrained tensor back on
its constraint surface (input side ``W U = S``, output side ``Q^T W = S``; ``S = 0`` for LoRA
factors), small tensors of one shape together in one batched matmul.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .targets import Target

_BATCH_NUMEL = 1 << 20  # tensors up to this size are projected in stacked groups after each step


def project(x: torch.Tensor, basis: torch.Tensor, side: str, strength: float | torch.Tensor = 1.0,
            stored: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``x`` with its component along ``basis`` removed (scaled by ``strength``), batched over leading dims.

    input side: x - s * (x U - S) U^T; output side: x - s * U (U^T x - S). ``S`` defaults to 0.
    """
    if side == "input":
        inner = x @ basis
        if stored is not None:
            inner = inner - stored
        return x - strength * (inner @ basis.transpose(-1, -2))
    inner = basis.transpose(-1, -2) @ x
    if stored is not None:
        inner = inner - stored
    return x - strength * (basis @ inner)


def _grad_hook(basis: torch.Tensor, side: str, strength: float):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(grad)
        clean = torch.where(finite, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)).float()
        out = project(clean, basis, side, strength)
        return torch.where(finite, out.to(grad.dtype), grad)

    return hook


@dataclass
class _Constraint:
    target: Target
    basis: torch.Tensor  # float32 on the parameter's device
    stored: torch.Tensor | None  # full weights: float32 constraint value at attach time


class GradientProjector:
    """Tensor hooks that project each constrained parameter's gradient (strength 1 in exact mode)."""

    def __init__(self, constraints: list[_Constraint], strength: float) -> None:
        self._handles = [c.target.param.register_hook(_grad_hook(c.basis, c.target.side, strength))
                         for c in constraints]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class WeightProjector:
    """Exact mode's post-step re-projection, grouped by (side, shape, device) for batched matmuls."""

    def __init__(self, constraints: list[_Constraint]) -> None:
        groups: dict[tuple, list[_Constraint]] = defaultdict(list)
        self._single: list[_Constraint] = []
        for c in constraints:
            p = c.target.param
            if p.numel() > _BATCH_NUMEL or c.stored is not None:
                self._single.append(c)
            else:
                groups[(c.target.side, tuple(p.shape), p.device, p.dtype)].append(c)
        self._groups = []
        for (side, _, _, _), members in groups.items():
            k = max(c.basis.shape[1] for c in members)
            stacked = torch.stack([torch.nn.functional.pad(c.basis, (0, k - c.basis.shape[1])) for c in members])
            self._groups.append((side, [c.target.param for c in members], stacked))

    @torch.no_grad()
    def __call__(self) -> None:
        for side, params, bases in self._groups:
            x = torch.stack([p.detach() for p in params]).float()
            y = project(x, bases, side).to(params[0].dtype)
            for p, new in zip(params, y.unbind(0)):
                p.copy_(new)
        for c in self._single:
            p = c.target.param
            p.copy_(project(p.detach().float(), c.basis, c.target.side, 1.0, c.stored).to(p.dtype))


def constraint_value(param: nn.Parameter, basis: torch.Tensor, side: str) -> torch.Tensor:
    """The quantity exact mode holds fixed for a full weight: W U (input side) or U^T W (output side)."""
    w = param.detach().float()
    return w @ basis if side == "input" else basis.T @ w
