"""``ConceptExclusion``: attach the projection to a model, keep it exact, report what leaked.

Guarantee in exact mode: after every optimizer step (registered on ``optimizer`` or called as
``after_optimizer_step``), each constrained tensor satisfies its constraint to float precision:
for key/value/pooled targets ``(W_eff - W_eff0) U = 0``, for the 'attention' set also
``Q_k^T (W_q,eff - W_q,eff0) = 0`` and ``(W_o,eff - W_o,eff0) Q_v = 0``. With ``project_context``,
training passes also read text states without their concept component (``concept_exclusion.context``).
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
from torch import nn

from .context import ContextProjector
from .distributed import ShardedGradientProjector, ShardedWeightProjector, refuse_unsupported_wrappers
from .dtensor import full_tensor, local_tensor
from .errors import TargetError
from .hooks import Hooks, OptimizerPostStep
from .metadata import Provenance, provenance_metadata
from .mmdit import default_project_context, find_mmdit_targets
from .options import check_mode_strength
from .preset import Projection
from .projector import GradientProjector, constraints_for
from .subspace import ConceptSubspace
from .targets import Target

log = logging.getLogger(__name__)


def text_encoder_training(model: nn.Module, text_encoders: Sequence[nn.Module]) -> list[str]:
    """Names of trainable text-encoder parts: given encoders, encoders inside ``model``, kohya TE LoRA modules."""
    found = []
    for i, enc in enumerate(text_encoders):
        if any(p.requires_grad for p in enc.parameters()):
            found.append(f"text_encoder[{i}]")
    for name, m in model.named_modules():
        is_encoder = type(m).__name__.startswith("CLIPTextModel") or type(m).__name__.startswith("T5Encoder")
        is_te_lora = str(getattr(m, "lora_name", "")).startswith("lora_te")
        if (is_encoder or is_te_lora) and any(p.requires_grad for p in m.parameters()):
            found.append(name or type(m).__name__)
    return found


class ConceptExclusion:
    """The projection attached to one model. Build it with ``ConceptExclusion.attach``."""

    # hooks whose callbacks hold the concept's bases: re-encoding detaches them, refreshes the bases, attaches them
    BASIS_HOOKS = ("gradient", "distributed", "context")

    def __init__(self, subspace: ConceptSubspace, targets: list[Target], mode: str, strength: float,
                 target_sets: tuple[str, ...], reencode_every: int | None, *, leakage_snapshots: bool = True,
                 model: nn.Module | None = None, base_model: nn.Module | None = None) -> None:
        self.subspace = subspace
        self.targets = targets
        self.mode = mode
        self.strength = strength
        self.target_sets = target_sets
        self.reencode_every = reencode_every
        self.steps = 0
        self.hooks = Hooks()
        self._context_requested = False
        self._model, self._base_model = model, base_model
        self._leakage_snapshots = leakage_snapshots
        self._constraints: list = []
        self._build(project_now=False)
        # the distributed hooks refuse what they cannot keep (sharded output sides, ZeRO-3) before any weight moves
        self.hooks.add("distributed", ShardedGradientProjector(self._constraints, self.strength))
        self.hooks.add("gradient", GradientProjector(self._constraints, self.strength))
        if mode == "exact":
            self._weights()
        # after the attach-time projection: an adapter that already held concept components (a resumed
        # or downloaded LoRA) loses them at attach, and leakage measures what training adds from there
        self._initial = {t.name: self._snapshot(t) for t in targets}

    # construction ---------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, subspace: ConceptSubspace, mode: str | None = None, *,
               strength: float | None = None, targets: Iterable[str] | str | None = None, optimizer=None,
               text_encoder: nn.Module | Sequence[nn.Module] | None = None,
               allow_text_encoder_training: bool = False, reencode_every: int = 100,
               base_model: nn.Module | None = None, leakage_snapshots: bool = True,
               project_context: bool | None = None) -> "ConceptExclusion":
        """Find the targets in ``model`` and start protecting them.

        mode/strength/targets default to the preset's ``[projection]``. In exact mode, LoRA factors
        are projected at once and full weights' constraint values are recorded now. ``optimizer``:
        register the post-step work on it (else call ``after_optimizer_step`` yourself).
        ``base_model``: the UNet a kohya-style network patches (needed for the 'attention' set).
        ``leakage_snapshots``: keep a CPU fp32 copy of each constrained full weight so ``leakage``
        reports ||dW U|| / ||dW||; False saves that memory (SD1.5: 77 MB, SDXL: 1.4 GB) and reports
        ||W U - W0 U|| / ||W0 U|| for full weights. LoRA factors need no copy when up @ down starts at 0.
        """
        defaults = subspace.preset.projection if subspace.preset is not None else Projection()
        mode = mode or defaults.mode
        if strength is None:
            strength = defaults.strength if mode == "gradient" else 1.0
        check_mode_strength(mode, strength, error=TargetError)
        sets = (targets,) if isinstance(targets, str) else tuple(targets or defaults.targets)
        encoders = [] if text_encoder is None else (
            list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder])
        refuse_unsupported_wrappers(model)
        training = text_encoder_training(model, encoders)
        if training and not allow_text_encoder_training:
            raise TargetError(f"text encoder parameters require grad ({', '.join(training[:3])}): the concept's "
                              f"embeddings would move and the exclusion would not hold; freeze the text encoder "
                              f"or pass allow_text_encoder_training=True (approximate: re-encodes every "
                              f"{reencode_every} steps)")
        if training:
            if not subspace.can_recompute:
                raise TargetError("allow_text_encoder_training=True needs a subspace built from the text encoders "
                                  "(from_text_encoder/from_text_encoders) so it can be re-encoded")
            log.warning("text encoder is training: the concept is re-encoded every %d steps and the exclusion "
                        "is approximate between re-encodings", reencode_every)
        if project_context is None:  # on by default for an MMDiT (Flux, SD3): see concept_exclusion.mmdit
            project_context = default_project_context(model if base_model is None else base_model,
                                                      defaults.project_context)
        found = find_mmdit_targets(model, subspace, sets, base_model, project_context)
        # the forward hooks first: they fail (no reader found) before any weight is projected, and go if attaching does
        context = ContextProjector(model if base_model is None else base_model, subspace) if project_context else None
        try:
            self = cls(subspace, found, mode, float(strength), sets, reencode_every if training else None,
                       leakage_snapshots=leakage_snapshots, model=model, base_model=base_model)
        except BaseException:
            if context is not None:
                context.detach()
            raise
        self.frozen_layers = sorted(t.name for t in found if t.basis.shape[1] >= t.basis.shape[0])
        if self.frozen_layers:  # e.g. to_q/to_out of heads no wider than the basis rank: never silently
            log.warning("%d of %d targets get no change at all: the concept basis spans their whole constrained "
                        "dimension (every head of to_q/to_out at rank >= head width): %s", len(self.frozen_layers),
                        len(found), ", ".join(self.frozen_layers[:6]) + (" ..." if len(self.frozen_layers) > 6 else ""))
        if context is not None:
            self.hooks.add("context", context)
            self._context_requested = True
        if optimizer is not None:
            self.register_optimizer(optimizer)
        log.info("concept exclusion attached: %d targets, mode=%s, ranks %s, context projected at %d layers",
                 len(found), mode, {s: subspace.rank(s) for s in subspace.bases}, len(context.readers) if context else 0)
        return self

    def _snapshot(self, t: Target) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """CPU fp32 copies leakage is measured from; None when not needed or not kept.

        LoRA: None when the attach-time product up @ down is 0 (PEFT/kohya initialise up to 0), so
        dW_eff is the product itself. Full weights: None when ``leakage_snapshots`` is False.
        """
        p0 = full_tensor(t.param.detach())
        if t.kind == "full":
            return (p0.to("cpu", torch.float32, copy=True), None) if self._leakage_snapshots else None
        o0 = full_tensor(t.other.detach())
        if not (bool(p0.any()) and bool(o0.any())):
            return None
        return p0.to("cpu", torch.float32, copy=True), o0.to("cpu", torch.float32, copy=True)

    def _build(self, project_now: bool) -> None:
        """(Re)build the constraints from the targets' bases, in place: the gradient hooks hold this very list."""
        self._constraints[:] = constraints_for(self.targets)
        self._weights = ShardedWeightProjector(self._constraints)
        if project_now:
            self._weights()

    def register_optimizer(self, optimizer) -> None:
        """Run ``after_optimizer_step`` after every real step of ``optimizer`` (skipped steps do nothing)."""
        if self.mode != "exact" and self.reencode_every is None:
            return
        self.hooks.add("optimizer", OptimizerPostStep(optimizer, self.after_optimizer_step))

    # training-time work ---------------------------------------------------------------------
    def after_optimizer_step(self) -> None:
        """Exact mode: put every constrained tensor back on its constraint (cheap, no host sync)."""
        self.steps += 1
        if self.reencode_every and self.steps % self.reencode_every == 0:
            self._reencode()
        if self.mode == "exact":
            self._weights()

    def _reencode(self) -> None:
        """Detach the hooks that hold bases, give every target its new basis from the role registry, attach them."""
        new = self.subspace.recompute()
        log.info("re-encoded the concept after %d steps (ranks %s)", self.steps, {s: new.rank(s) for s in new.bases})
        found = find_mmdit_targets(self._model, new, self.target_sets, self._base_model, self._context_requested)
        fresh = {t.name: t.basis for t in found}
        missing = [t.name for t in self.targets if t.name not in fresh]
        if missing:
            raise TargetError(f"re-encoding: {missing[0]} is no longer a target of the model; keep the model's "
                              f"layers unchanged while the exclusion is attached")
        hooks = [h for name, h in self.hooks if name in self.BASIS_HOOKS and h.attached]  # in attach order
        for hook in reversed(hooks):
            hook.detach()
        for t in self.targets:
            t.basis = fresh[t.name]
        self.subspace = new
        context = self.hooks.get("context")
        if context is not None:
            context.subspace = new
        self._build(project_now=(self.mode == "exact"))
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
            delta = self._delta(c.target)
            basis = c.basis.cpu()
            norm = float(delta.norm())
            part = delta @ basis if c.target.side == "input" else basis.T @ delta
            out[c.target.name] = float(part.norm()) / norm if norm > 0 else 0.0
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
        o = full_tensor(t.other.detach()).float().cpu()
        effective = o @ p if t.side == "input" else p @ o  # input: param = down [r, in], other = up [out, r]
        if initial is None:  # the product was 0 at attach
            return effective
        p0, o0 = initial
        return effective - (o0 @ p0 if t.side == "input" else p0 @ o0)

    def max_leakage(self) -> float:
        values = self.leakage().values()
        return max(values) if values else 0.0

    def provenance(self) -> Provenance:
        """The plain record ``concept_exclusion.metadata`` writes: settings, subspace and the leakage measured now."""
        return Provenance(self.subspace, self.mode, self.strength, tuple(self.target_sets), len(self.targets),
                          self._context_requested, self.leakage(), self.steps,
                          tuple(getattr(self, "frozen_layers", ())))

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
            elif c.target.kind == "full" and not self._leakage_snapshots:
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
        """Whether training passes read the text states without the concept's component now (False once detached;
        the provenance keeps whether this exclusion was attached with it)."""
        context = self.hooks.get("context")
        return context is not None and context.attached

    @property
    def context(self) -> ContextProjector | None:
        """The context projector hook (attached or not), None when this exclusion was attached without one."""
        hook = self.hooks.get("context")
        return hook if isinstance(hook, ContextProjector) else None

    _context = context  # the name tests of the evidence world read

    @property
    def attached(self) -> bool:
        """Whether any hook of this exclusion is installed."""
        return self.hooks.attached

    def detach(self) -> None:
        """Remove every hook this exclusion installed (gradient, distributed, context, optimizer)."""
        self.hooks.detach()

    def __repr__(self) -> str:
        return (f"ConceptExclusion(mode={self.mode!r}, targets={len(self.targets)}, "
                f"sets={list(self.target_sets)}, project_context={self.project_context}, "
                f"ranks={ {s: self.subspace.rank(s) for s in self.subspace.bases} })")
