"""The projection under sharded data parallelism (FSDP2 ``fully_shard``: DTensor parameters).

FSDP2 shards each weight on dim 0 (its output rows) and, in backward, reduce-scatters the
*unsharded* parameter's gradient straight into the sharded parameter's ``.grad``: a tensor hook
registered on the sharded parameter never fires (measured with torch 2.13, gloo, CPU). What does
fire is ``register_post_accumulate_grad_hook`` on the sharded parameter, after the reduce-scatter
and before clipping or the optimizer step. There the gradient is a DTensor whose local shard holds
whole rows, so an input-side projection ``G <- G - (G U) U^T`` is shard-local and exact.

Invariant kept: for every sharded input-side target, each rank's local rows of ``.grad`` and of
the weight satisfy the same constraint as an unsharded tensor would (``G U = 0``; exact mode:
``(W - W0) U = 0``). Output-side constraints (``to_q``: ``U^T dW = 0``) mix rows held by
different ranks, so they are refused rather than trained without the guarantee; so are the
legacy ``FullyShardedDataParallel`` wrapper (flat parameters), non-row shardings and DeepSpeed ZeRO-3
parameters (recognised by their ``ds_id`` attribute).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from concept_exclusion.hooks.dtensor import is_sharded, local_tensor
from concept_exclusion.hooks.gradient import Constraint, GradientHooks, WeightProjector, project_grad, project_in_place

__all__ = ["ShardedGradientProjector", "ShardedWeightProjector"]

log = logging.getLogger(__name__)

def _project_local_grad(basis: torch.Tensor, strength: float) -> Callable[[torch.Tensor], None]:
    """Post-accumulate-grad hook: project this rank's rows of ``param.grad`` in place, non-finite entries kept."""
    def hook(param: torch.Tensor) -> None:
        if param.grad is None:
            return
        g = local_tensor(param.grad)
        g.copy_(project_grad(g, basis, "input", strength))

    return hook


class ShardedGradientProjector(GradientHooks):
    """Post-accumulate-grad hooks projecting the sharded (DTensor) targets' gradients on each rank's rows.

    Ordinary targets are ``GradientProjector``'s; what cannot be kept shard-locally was refused by the plan
    (``concept_exclusion.model.plan.check_sharded``) before anything was installed.
    """

    def _install(self) -> list:
        handles = super()._install()
        if handles:
            log.info("projecting %d FSDP-sharded target(s) shard-locally after the reduce-scatter", len(handles))
        return handles

    def _takes(self, c: Constraint) -> bool:
        return is_sharded(c.target.param)

    def _hook_one(self, c: Constraint):
        return c.target.param.register_post_accumulate_grad_hook(_project_local_grad(c.basis, self.strength))


class ShardedWeightProjector:
    """Exact mode's post-step re-projection for ordinary targets and, on each rank's rows, sharded ones."""

    def __init__(self, constraints: Sequence[Constraint]) -> None:
        self._plain = WeightProjector([c for c in constraints if not is_sharded(c.target.param)])
        self._sharded = [c for c in constraints if is_sharded(c.target.param)]

    @torch.no_grad()
    def __call__(self) -> None:
        self._plain()
        for c in self._sharded:
            project_in_place(local_tensor(c.target.param), c.basis, "input", c.stored)
