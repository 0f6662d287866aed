"""validate -> plan: what the exclusion will constrain and hook in a model, found in one walk, nothing installed.

``plan_exclusion`` walks each module tree once (``scan``: the model, and the UNet a kohya-style network
patches when that is another tree), checks every setting, refuses what it cannot keep, and returns a
``Plan``: the constrained tensors with their bases, the layers whose text input is projected, and the
settings in force. ``ConceptExclusion`` installs a plan; re-encoding re-resolves the same scans with the
new bases (``Plan.rebase``), so the model is never walked again. ``find_targets`` and ``context_readers``
are views of a plan, so they cannot disagree with ``attach``.

Invariant: a call either raises (``TargetError``/``SubspaceError``, one line naming the layer or setting) or
returns a plan; in neither case has a hook been installed or a weight changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import torch
from torch import nn

from concept_exclusion.concept.preset import Projection
from concept_exclusion.concept.subspace import ConceptSubspace
from concept_exclusion.errors import TargetError
from concept_exclusion.model.mmdit import context_alone
from concept_exclusion.model.roles import ROLES, basis_for, roles_in
from concept_exclusion.model.scan import Scan, scan, trainable_weight
from concept_exclusion.model.targets import Target, lora_factors, unsupported_factor
from concept_exclusion.options import AttachOptions, check_mode_strength

log = logging.getLogger(__name__)

class Reader(NamedTuple):
    """A layer whose input is the text states: context projection hooks it, against ``basis``."""

    name: str
    module: nn.Module
    basis: torch.Tensor


@dataclass(frozen=True)
class Settings:
    """The settings in force: the preset's ``[projection]`` with the caller's overrides, checked."""

    mode: str
    strength: float
    sets: tuple[str, ...]
    project_context: bool
    reencode_every: int | None  # None: the text encoder is frozen, nothing is ever re-encoded


@dataclass
class Plan:
    """Everything ``ConceptExclusion`` installs, found by ``plan_exclusion``."""

    settings: Settings
    targets: list[Target]
    readers: list[Reader]
    model: Scan
    forward: Scan  # the tree that runs the forward pass (the UNet a kohya network patches, else the model)

    @property
    def frozen_layers(self) -> tuple[str, ...]:
        """Targets that get no change at all: the basis spans their whole constrained dimension."""
        return tuple(sorted(t.name for t in self.targets if t.basis.shape[1] >= t.basis.shape[0]))

    def rebase(self, subspace: ConceptSubspace) -> None:
        """Give every target and reader its basis from ``subspace`` (re-encoding), in place, from the same scans.

        The lists are updated in place: hooks built from them read the new bases when they attach again.
        """
        fresh = {t.name: t.basis for t in _targets(self.model, self.forward, subspace, self.settings.sets)}
        missing = [t.name for t in self.targets if t.name not in fresh]
        if missing:
            raise TargetError(f"re-encoding: {missing[0]} is no longer a target of the model; keep the model's "
                              f"layers unchanged while the exclusion is attached")
        for t in self.targets:
            t.basis = fresh[t.name]
        if self.settings.project_context:
            self.readers[:] = _readers(self.forward, subspace)


def projection_of(subspace: ConceptSubspace) -> Projection:
    """The ``[projection]`` of the preset the subspace was built from (defaults when it has none)."""
    return subspace.preset.projection if subspace.preset is not None else Projection()


def _encoder_parts(model: Scan, encoders: Sequence[nn.Module]) -> list[str]:
    given = [f"text_encoder[{i}]" for i, enc in enumerate(encoders) if any(p.requires_grad for p in enc.parameters())]
    return given + model.encoder_parts


def _settings(subspace: ConceptSubspace, projection: Projection, options: AttachOptions, model: Scan,
              forward: Scan, encoders: Sequence[nn.Module]) -> Settings:
    mode, strength = projection.mode, float(projection.strength)
    check_mode_strength(mode, strength, error=TargetError)
    sets = tuple(projection.targets)
    roles_in(sets)  # an unknown set is refused here
    training = _encoder_parts(model, encoders)
    if training and not options.allow_text_encoder_training:
        raise TargetError(f"text encoder parameters require grad ({', '.join(training[:3])}): the concept's "
                          f"embeddings would move and the exclusion would not hold; freeze the text encoder (kohya: "
                          f"--network_train_unet_only) or allow its training, approximate, re-encoding every "
                          f"{options.reencode_every} steps (AttachOptions(allow_text_encoder_training=True); kohya: "
                          f"network_args concept_allow_text_encoder_training=true)")
    if training and not subspace.can_recompute:
        raise TargetError("allow_text_encoder_training=True needs a subspace built from the text encoders "
                          "(from_text_encoder/from_text_encoders) so it can be re-encoded")
    project_context = projection.project_context
    if project_context is None:  # the model's default: on for an MMDiT, where the blocks mix text and image tokens
        project_context = forward.is_mmdit
        if project_context:
            log.info("%s is an MMDiT: context projection is on (set project_context=False to turn it off)",
                     type(forward.root).__name__)
    if training:
        log.warning("text encoder is training: the concept is re-encoded every %d steps and the exclusion "
                    "is approximate between re-encodings", options.reencode_every)
    return Settings(mode, strength, sets, bool(project_context), options.reencode_every if training else None)


def _attention_lookup(model: Scan, forward: Scan):
    def lookup(path: str) -> nn.Module | None:
        return model.attention.get(path) or forward.attention.get(path)

    return lookup


def _targets(model: Scan, forward: Scan, subspace: ConceptSubspace, sets: tuple[str, ...]) -> list[Target]:
    """Every trainable tensor of ``model``'s layers that the sets constrain, with its basis, in walk order."""
    roles = roles_in(sets)
    attention = _attention_lookup(model, forward)
    targets: list[Target] = []
    skipped: set[str] = set()
    for layer in model.layers:
        if layer.role not in roles:
            continue
        factors = lora_factors(layer.module)
        full = trainable_weight(layer.module)
        if not factors:
            unsupported = unsupported_factor(layer.module)
            if unsupported:
                raise TargetError(f"{layer.name}: {unsupported} (LoHa/LoKr/OFT) cannot be projected exactly; "
                                  f"use a LoRA/LoCon network on the cross-attention layers")
            if full is None:
                continue
        if ROLES[layer.role].space not in subspace.bases:
            skipped.add(layer.role)
            continue
        in_features = factors[0][1].shape[1] if factors else full.shape[1]
        side, basis = basis_for(layer.role, layer.name, subspace.bases, in_features, attention)
        for adapter, down, up in factors:
            name = layer.name + ("" if len(factors) == 1 else f"[{adapter}]")
            param, other = (down, up) if side == "input" else (up, down)
            targets.append(Target(name, layer.role, "lora", side, param, other, basis))
        if full is not None:
            targets.append(Target(layer.name + (":base" if factors else ""), layer.role, "full", side, full, None,
                                  basis))
    for role in sorted(skipped):
        log.warning("the model's %s layers (%s) are trainable but the subspace has no %r basis (build it from all "
                    "of the model's text encoders); that path is not protected", role, ROLES[role].label,
                    ROLES[role].space)
    return targets


def _some_readers(forward: Scan, subspace: ConceptSubspace) -> list[Reader]:
    """``_readers``, refused when there is none (context projection would then project nothing)."""
    readers = _readers(forward, subspace)
    if not readers:
        labels = " / ".join(r.label for r in ROLES.values() if r.reads_text)
        raise TargetError(f"project_context: no layer of {type(forward.root).__name__} reads text states (searched "
                          f"for {labels}); pass the UNet itself (kohya: base_model=)")
    return readers


def _readers(forward: Scan, subspace: ConceptSubspace) -> list[Reader]:
    """Every layer of the forward tree whose input is the text states, trainable or not, with its basis."""
    readers, warned = [], set()
    for layer in forward.layers:
        row = ROLES[layer.role]
        in_features = getattr(getattr(layer.module, "base_layer", layer.module), "in_features", None)
        if not row.reads_text or in_features is None:
            continue
        if row.space not in subspace.bases:
            if layer.role not in warned:
                log.warning("%s reads the %s text embedding but the subspace has no %r basis (build it from all "
                            "of the model's text encoders); its input is not projected", layer.name, row.space,
                            row.space)
                warned.add(layer.role)
            continue
        _, basis = basis_for(layer.role, layer.name, subspace.bases, in_features)
        readers.append(Reader(layer.name, layer.module, basis))
    return readers


def plan_exclusion(model: nn.Module, subspace: ConceptSubspace, projection: Projection | None = None, *,
                   text_encoder: nn.Module | Sequence[nn.Module] | None = None, base_model: nn.Module | None = None,
                   options: AttachOptions | None = None) -> Plan:
    """Validate and plan the exclusion of ``subspace`` from ``model`` (see the module doc); installs nothing.

    ``projection``: the settings (default: the preset's ``[projection]``; ``Projection.overridden`` changes a few).
    ``base_model``: the UNet a kohya-style network patches (the forward tree). ``text_encoder``: the encoder(s)
    the caller trains with, checked for trainable parameters.
    """
    options = options or AttachOptions()
    projection = projection or projection_of(subspace)
    encoders = [] if text_encoder is None else (
        list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder])
    model_scan = scan(model)
    forward = model_scan if base_model is None or base_model is model else scan(base_model)
    if model_scan.fsdp1 is not None:
        raise TargetError(f"{model_scan.fsdp1} is wrapped by FullyShardedDataParallel (FSDP1): its flat parameters "
                          f"hide the per-layer gradients the projection needs; attach before wrapping and use FSDP2 "
                          f"(torch.distributed.fsdp.fully_shard) or DDP")
    settings = _settings(subspace, projection, options, model_scan, forward, encoders)
    context_only = forward.is_mmdit and context_alone(model_scan, forward, subspace, settings.project_context)
    targets = [] if context_only else _targets(model_scan, forward, subspace, settings.sets)
    if not targets and not context_only:
        roles = roles_in(settings.sets)
        searched = len(model_scan.layers)
        wanted = ", ".join(ROLES[r].pattern.pattern for r in ROLES if r in roles)
        raise TargetError(f"no trainable target in {type(model).__name__}: searched {searched} matching layer(s) "
                          f"for patterns {wanted} (sets: {', '.join(settings.sets)}) with LoRA factors or trainable "
                          f"weights")
    readers = _some_readers(forward, subspace) if settings.project_context else []
    check_sharded(targets)
    return Plan(settings, targets, readers, model_scan, forward)


def check_sharded(targets: Iterable[Target]) -> None:
    """Refuse sharded targets whose constraint is not shard-local (output side, not sharded on rows, ZeRO-3)."""
    from concept_exclusion.hooks.dtensor import is_sharded

    for t in targets:
        p = t.param
        if hasattr(p, "ds_id") or hasattr(p, "ds_tensor"):
            raise TargetError(f"{t.name}: partitioned by DeepSpeed ZeRO-3 (the parameter is gathered only "
                              f"inside forward/backward, so its update cannot be checked or re-projected); use "
                              f"ZeRO stage 1 or 2, DDP or FSDP2")
        if not is_sharded(p):
            continue
        placements = tuple(p.placements)
        if not all(pl.is_replicate() or (pl.is_shard() and pl.dim == 0) for pl in placements):
            raise TargetError(f"{t.name}: sharded as {placements}; the projection is shard-local only when "
                              f"parameters are sharded on dim 0 (FSDP2's default)")
        if t.side != "input":
            raise TargetError(f"{t.name}: its constraint (U^T dW = 0, output side) spans rows held by "
                              f"different FSDP ranks, so it cannot be kept shard-locally; use the 'kv' target set "
                              f"under FSDP, or DDP")


def find_targets(model: nn.Module, subspace: ConceptSubspace, projection: Projection | None = None, *,
                 base_model: nn.Module | None = None) -> list[Target]:
    """The tensors ``ConceptExclusion.attach`` would constrain, with their bases (``plan_exclusion(...).targets``)."""
    return plan_exclusion(model, subspace, projection, base_model=base_model).targets


def context_readers(model: nn.Module, subspace: ConceptSubspace) -> list[Reader]:
    """The layers context projection would hook in ``model`` (the module that runs the forward pass)."""
    return _some_readers(scan(model), subspace)
