"""``ConceptExclusion``: attach the projection to a model, keep it exact, report what leaked.

Guarantee in exact mode: after every optimizer step (registered on ``optimizer`` or called as
``after_optimizer_step``), each constrained tensor satisfies its constraint to float precision:
for key/value/pooled targets ``(W_eff - W_eff0) U = 0``, for the 'attention' set also
``Q_k^T (W_q,eff - W_q,eff0) = 0`` and ``(W_o,eff - W_o,eff0) Q_v = 0``. With ``project_context``,
training passes also read text states without their concept component (``concept_exclusion.hooks.context``).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from concept_exclusion.concept.preset import Projection
from concept_exclusion.concept.subspace import ConceptSubspace
from concept_exclusion.errors import TargetError
from concept_exclusion.hooks.base import Hooks, OptimizerPostStep
from concept_exclusion.hooks.context import ContextProjector
from concept_exclusion.hooks.dtensor import full_tensor, local_tensor
from concept_exclusion.hooks.gradient import GradientProjector, constraints_for
from concept_exclusion.hooks.sharded import ShardedGradientProjector, ShardedWeightProjector
from concept_exclusion.metadata import Provenance, provenance_metadata
from concept_exclusion.model.plan import Plan, plan_exclusion
from concept_exclusion.model.targets import Target
from concept_exclusion.options import AttachOptions

log = logging.getLogger(__name__)


class ConceptExclusion:
    """The projection attached to one model: ``ConceptExclusion.attach`` validates, plans and installs it.

    ``ConceptExclusion(plan)`` is inert: its hooks exist but nothing is installed and no weight has moved
    until ``install``; ``uninstall`` removes every hook ``install`` put in (the one symmetric pair).
    """

    # hooks whose callbacks hold the concept's bases: re-encoding detaches them, rebases the plan, attaches them
    BASIS_HOOKS = ("gradient", "distributed", "context")

    def __init__(self, plan: Plan, subspace: ConceptSubspace, options: AttachOptions | None = None) -> None:
        self.plan = plan
        self.subspace = subspace
        self.options = options or AttachOptions()
        self.steps = 0
        self._constraints = constraints_for(plan.targets)
        self._weights = ShardedWeightProjector(self._constraints)
        self._initial: dict[str, tuple[torch.Tensor, torch.Tensor | None] | None] = {}
        self.hooks = Hooks()
        strength = plan.settings.strength
        self.hooks.add("distributed", ShardedGradientProjector(self._constraints, strength))
        self.hooks.add("gradient", GradientProjector(self._constraints, strength))
        if plan.readers:
            self.hooks.add("context", ContextProjector(plan.readers))

    # construction ---------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, subspace: ConceptSubspace, projection: Projection | None = None, *,
               optimizer=None, text_encoder: nn.Module | Sequence[nn.Module] | None = None,
               base_model: nn.Module | None = None, options: AttachOptions | None = None) -> "ConceptExclusion":
        """Validate, plan (``concept_exclusion.model.plan``) and install the exclusion of ``subspace`` from ``model``.

        ``projection``: what to constrain and how (default: the preset's ``[projection]``;
        ``Projection.overridden`` changes a few settings). ``optimizer``: run the post-step work on it (else call
        ``after_optimizer_step`` yourself). ``text_encoder``: the encoder(s) you train with, checked for trainable
        parameters. ``base_model``: the UNet a kohya-style network patches. ``options``: ``AttachOptions``.
        Every refusal happens before a hook is installed or a weight changes.
        """
        plan = plan_exclusion(model, subspace, projection, text_encoder=text_encoder, base_model=base_model,
                              options=options)
        exclusion = cls(plan, subspace, options)
        if optimizer is not None:
            exclusion.register_optimizer(optimizer)
        exclusion.install()
        if plan.frozen_layers:  # e.g. to_q/to_out of heads no wider than the basis rank: never silently
            frozen = plan.frozen_layers
            log.warning("%d of %d targets get no change at all: the concept basis spans their whole constrained "
                        "dimension (every head of to_q/to_out at rank >= head width): %s", len(frozen),
                        len(plan.targets), ", ".join(frozen[:6]) + (" ..." if len(frozen) > 6 else ""))
        log.info("concept exclusion attached: %d targets, mode=%s, ranks %s, context projected at %d layers",
                 len(plan.targets), exclusion.mode, {s: subspace.rank(s) for s in subspace.bases},
                 len(plan.readers))
        return exclusion

    def install(self) -> None:
        """Install every hook; exact mode puts the targets on their constraint now. Leakage is measured from here:
        an adapter that already held concept components (a resumed or downloaded LoRA) loses them now."""
        if self.attached:
            return
        self.hooks.attach()
        if self.mode == "exact":
            self._weights()
        self._initial = {t.name: self._snapshot(t) for t in self.targets}

    def uninstall(self) -> None:
        """Remove every hook ``install`` and ``register_optimizer`` put in; the weights stay as they are."""
        self.hooks.detach()

    # the plan's settings ----------------------------------------------------------------------
    @property
    def targets(self) -> list[Target]:
        return self.plan.targets

    @property
    def mode(self) -> str:
        return self.plan.settings.mode

    @property
    def strength(self) -> float:
        return self.plan.settings.strength

    @property
    def target_sets(self) -> tuple[str, ...]:
        return self.plan.settings.sets

    @property
    def reencode_every(self) -> int | None:
        return self.plan.settings.reencode_every

    @property
    def frozen_layers(self) -> tuple[str, ...]:
        return self.plan.frozen_layers

    def _snapshot(self, t: Target) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """CPU fp32 copies leakage is measured from; None when not needed or not kept.

        LoRA: None when the attach-time product up @ down is 0 (PEFT/kohya initialise up to 0), so
        dW_eff is the product itself. Full weights: None when ``leakage_snapshots`` is False.
        """
        p0 = full_tensor(t.param.detach())
        if t.kind == "full":
            return (p0.to("cpu", torch.float32, copy=True), None) if self.options.leakage_snapshots else None
        o0 = full_tensor(t.other.detach())
        if not (bool(p0.any()) and bool(o0.any())):
            return None
        return p0.to("cpu", torch.float32, copy=True), o0.to("cpu", torch.float32, copy=True)

    def register_optimizer(self, optimizer) -> None:
        """Run ``after_optimizer_step`` after every real step of ``optimizer`` (skipped steps do nothing); installed
        now when the exclusion is, else with ``install``."""
        if self.mode != "exact" and self.reencode_every is None:
            return
        installed = self.attached
        self.hooks.add("optimizer", OptimizerPostStep(optimizer, self.after_optimizer_step))
        if installed:
            self.hooks.attach()

    # training-time work ---------------------------------------------------------------------
    def after_optimizer_step(self) -> None:
        """Exact mode: put every constrained tensor back on its constraint (cheap, no host sync)."""
        self.steps += 1
        if self.reencode_every and self.steps % self.reencode_every == 0:
            self._reencode()
        if self.mode == "exact":
            self._weights()

    def _reencode(self) -> None:
        """Detach the hooks that hold bases, rebase the plan from the same scans (no walk), attach them again."""
        new = self.subspace.recompute()
        log.info("re-encoded the concept after %d steps (ranks %s)", self.steps, {s: new.rank(s) for s in new.bases})
        hooks = [h for name, h in self.hooks if name in self.BASIS_HOOKS and h.attached]  # in attach order
        for hook in reversed(hooks):
            hook.detach()
        self.plan.rebase(new)
        self.subspace = new
        self._constraints[:] = constraints_for(self.targets)  # the gradient hooks hold this very list
        self._weights = ShardedWeightProjector(self._constraints)
        if self.mode == "exact":
            self._weights()
        for hook in hooks:
            hook.attach()

    # reporting ------------------------------------------------------------------------------
    @torch.no_grad()
    def leakage(self) -> dict[str, float]:
        """Per target: ||constraint part of dW_eff|| / ||dW_eff|| since attach (0 when dW_eff is 0).

        Full weights attached with ``leakage_snapshots=False`` report ||W U - W0 U|| / ||W0 U||
        instead (output side: ||U^T W - U^T W0|| / ||U^T W0||; this rank's rows when sharded).
        """
        out = {}
        for c in self._constraints:
            if self._initial[c.target.name] is None and c.target.kind == "full":
                out[c.target.name] = self._constraint_drift(c)
                continue
            out[c.target.name] = c.target.leakage(self._delta(c.target))
        return out

    @staticmethod
    def _constraint_drift(c) -> float:
        """||W U - S|| / ||S|| (input side; output side with U^T W), or ||W U - S|| when S is 0."""
        w = local_tensor(c.target.param.detach()).float()
        now = w @ c.basis if c.target.side == "input" else c.basis.T @ w
        drift, ref = float((now - c.stored).norm()), float(c.stored.norm())
        return drift / ref if ref > 0 else drift

    def _delta(self, t: Target) -> torch.Tensor:
        initial = self._initial[t.name]
        p = full_tensor(t.param.detach()).float().cpu()
        if t.kind == "full":
            return p - initial[0]
        effective = t.product(p, full_tensor(t.other.detach()).float().cpu())
        if initial is None:  # the product was 0 at attach
            return effective
        return effective - t.product(*initial)

    def memory(self) -> dict[str, int]:
        """Bytes this exclusion keeps alive beyond the model, each storage counted once: the bases on the targets'
        devices, exact mode's stored constraint values, the leakage snapshots; and how many constraints it keeps."""
        seen: set[int] = set()

        def size(t: torch.Tensor | None) -> int:
            if t is None or t.untyped_storage().data_ptr() in seen:
                return 0
            seen.add(t.untyped_storage().data_ptr())
            return t.untyped_storage().nbytes()

        return {"device_bases": sum(size(c.basis) for c in self._constraints),
                "stored": sum(size(c.stored) for c in self._constraints),
                "snapshots": sum(size(t) for v in self._initial.values() if v is not None for t in v if t is not None),
                "constraints": len(self._constraints)}

    def max_leakage(self) -> float:
        values = self.leakage().values()
        return max(values) if values else 0.0

    def provenance(self) -> Provenance:
        """The plain record ``concept_exclusion.metadata`` writes: settings, subspace and the leakage measured now."""
        return Provenance(self.subspace, self.mode, self.strength, tuple(self.target_sets), len(self.targets),
                          self.plan.settings.project_context, self.leakage(), self.steps, self.frozen_layers)

    def metadata(self) -> dict[str, str]:
        """String-only provenance for safetensors (``concept_exclusion.*`` keys)."""
        return provenance_metadata(self.provenance())

    # state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """What resuming needs: attach-time constraint values and the snapshots leakage is measured from."""
        state = {}
        for c in self._constraints:
            initial = self._initial[c.target.name]
            if initial is None:
                if c.target.kind == "lora":  # marker: up @ down was 0 at attach
                    state[f"initial_zero.{c.target.name}"] = torch.ones(1)
            else:
                p0, o0 = initial
                state[f"initial.{c.target.name}"] = p0
                if o0 is not None:
                    state[f"initial_other.{c.target.name}"] = o0
            if c.stored is not None:
                state[f"stored.{c.target.name}"] = c.stored.cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the attach-time values saved by ``state_dict`` (shapes must match this model's targets)."""
        for c in self._constraints:
            name = c.target.name
            key = f"initial.{name}"
            if c.target.kind == "lora" and f"initial_zero.{name}" in state:
                self._initial[name] = None
            elif c.target.kind == "full" and not self.options.leakage_snapshots:
                self._initial[name] = None
            elif key not in state or state[key].shape != c.target.param.shape:
                raise TargetError(f"exclusion state lacks a matching {key!r}")
            else:
                other = state.get(f"initial_other.{name}")
                self._initial[name] = (state[key].float().cpu(), None if other is None else other.float().cpu())
            if c.stored is not None:
                stored = state.get(f"stored.{name}")
                if stored is None or stored.shape != c.stored.shape:
                    raise TargetError(f"exclusion state lacks a matching 'stored.{name}'")
                c.stored.copy_(stored.to(c.stored.device))
        self._weights = ShardedWeightProjector(self._constraints)

    @property
    def project_context(self) -> bool:
        """Whether training passes read the text states without the concept's component now (False once
        uninstalled; the provenance keeps whether this exclusion was planned with it)."""
        context = self.hooks.get("context")
        return context is not None and context.attached

    @property
    def context(self) -> ContextProjector | None:
        """The context projector hook (installed or not), None when the plan has no context projection."""
        hook = self.hooks.get("context")
        return hook if isinstance(hook, ContextProjector) else None

    @property
    def attached(self) -> bool:
        """Whether any hook of this exclusion is installed."""
        return self.hooks.attached

    def __repr__(self) -> str:
        return (f"ConceptExclusion(mode={self.mode!r}, targets={len(self.targets)}, "
                f"sets={list(self.target_sets)}, project_context={self.project_context}, "
                f"ranks={ {s: self.subspace.rank(s) for s in self.subspace.bases} })")
