"""Finding the weights that read the concept, and the basis each one's update must avoid.

Recognised layouts: diffusers UNets (full weights), PEFT LoRA (``lora_A``/``lora_B``, base layer
renamed ``base_layer``), kohya-style LoRA modules (``lora_down``/``lora_up``, named
``lora_unet_..._attn2_to_k``, diffusers or SAI/SDXL paths; LyCORIS' LoCon follows it). Which
layers are targets, and against which basis, is the role registry's (``concept_exclusion.roles``).

A ``Target`` says which tensor is constrained and on which side:
- input side: ``dW @ basis == 0`` (the layer's reading of the basis directions never changes);
- output side: ``basis.T @ dW == 0`` (the layer's output never moves along the basis).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .errors import TargetError
from .roles import ROLES, basis_for, canonical_name, head_basis, role_of, roles_in
from .subspace import ConceptSubspace

log = logging.getLogger(__name__)

__all__ = ["Target", "find_targets", "lora_factors", "canonical_name", "role_of", "head_basis", "basis_for"]

_UNSUPPORTED_FACTORS = ("hada_w1_a", "hada_w2_a", "lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a", "oft_blocks",
                        "oft_diag")


@dataclass
class Target:
    """One constrained tensor. ``param`` is the full weight, a LoRA down (input side) or up (output side)."""

    name: str
    role: str
    kind: str  # "full" | "lora"
    side: str  # "input" | "output"
    param: nn.Parameter
    other: nn.Parameter | None  # the LoRA factor not constrained (for the effective delta)
    basis: torch.Tensor  # float64 [dim, k], orthonormal columns, on the CPU


def lora_factors(module: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(adapter, down weight, up weight) for a PEFT LoRA layer or a kohya-style LoRA module; [] otherwise."""
    if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):
        magnitude = getattr(module, "lora_magnitude_vector", None)
        out = []
        for adapter in module.lora_A.keys():
            if magnitude is not None and adapter in magnitude:
                raise TargetError(f"{adapter!r} on this layer is DoRA: its magnitude vector rescales the "
                                  f"concept's key/value rows, so the exclusion cannot be exact; use plain LoRA")
            if adapter in module.lora_B:
                out.append((adapter, module.lora_A[adapter].weight, module.lora_B[adapter].weight))
        return out
    if hasattr(module, "lora_down") and hasattr(module, "lora_up"):
        if getattr(module, "dora_scale", None) is not None:
            raise TargetError("DoRA (dora_scale) rescales the concept's key/value rows, so the exclusion "
                              "cannot be exact; train without DoRA")
        if getattr(module, "lora_mid", None) is not None:
            raise TargetError("a Tucker-decomposed LoRA (lora_mid) cannot be projected exactly")
        down, up = module.lora_down, module.lora_up
        if not isinstance(down, nn.Linear) or not isinstance(up, nn.Linear):
            raise TargetError(f"lora_down/lora_up are {type(down).__name__}/{type(up).__name__}, expected Linear")
        return [("default", down.weight, up.weight)]
    return []


def _kohya_name(name: str, module: nn.Module) -> str:
    return getattr(module, "lora_name", None) or name


def attention_index(model: nn.Module, base_model: nn.Module | None = None) -> dict[str, nn.Module]:
    """Attention modules (those with ``heads``) by canonical path and by kohya ``lora_unet_`` path."""
    index: dict[str, nn.Module] = {}
    for root in (model, base_model):
        if root is None:
            continue
        for name, m in root.named_modules():
            if hasattr(m, "heads"):
                path = canonical_name(name)
                index[path] = m
                index["lora_unet_" + path.replace(".", "_")] = m
    return index


def _trainable_weight(module: nn.Module) -> nn.Parameter | None:
    holder = getattr(module, "base_layer", module)
    if isinstance(holder, nn.Linear) and holder.weight.requires_grad:
        return holder.weight
    return None


def find_targets(model: nn.Module, subspace: ConceptSubspace, target_sets: Iterable[str],
                 base_model: nn.Module | None = None) -> list[Target]:
    """Every trainable tensor in ``model`` that the named target sets constrain, with its basis.

    ``base_model`` is the UNet that kohya-style LoRA modules patch; it is needed only for rows whose
    basis comes from attention heads (the 'attention' set), which depend on the base key/value weights.
    Invariant: the same model, subspace and sets give the same targets in the same order.
    """
    sets = tuple(target_sets)
    roles = roles_in(sets)
    needs_heads = any(ROLES[r].shape == "heads" for r in roles)
    attention = attention_index(model, base_model) if needs_heads else {}
    targets: list[Target] = []
    searched = 0
    skipped: set[str] = set()
    for raw_name, module in model.named_modules():
        name = canonical_name(_kohya_name(raw_name, module))
        role = role_of(name)
        if role is None:
            continue
        searched += 1
        if role not in roles:
            continue
        factors = lora_factors(module)
        if not factors:
            for attr in _UNSUPPORTED_FACTORS:
                if getattr(module, attr, None) is not None:
                    raise TargetError(f"{name}: {attr} (LoHa/LoKr/OFT) cannot be projected exactly; "
                                      f"use a LoRA/LoCon network on the cross-attention layers")
        full = _trainable_weight(module)
        if not factors and full is None:
            continue
        if ROLES[role].space not in subspace.bases:
            skipped.add(role)
            continue
        in_features = factors[0][1].shape[1] if factors else full.shape[1]
        side, basis = basis_for(role, name, subspace.bases, in_features, attention)
        for adapter, down, up in factors:
            suffix = "" if len(factors) == 1 else f"[{adapter}]"
            if side == "input":
                targets.append(Target(name + suffix, role, "lora", side, down, up, basis))
            else:
                targets.append(Target(name + suffix, role, "lora", side, up, down, basis))
        if full is not None:
            targets.append(Target(name + (":base" if factors else ""), role, "full", side, full, None, basis))
    for role in sorted(skipped):
        log.warning("the model's %s layers (%s) are trainable but the subspace has no %r basis (build it from all "
                    "of the model's text encoders); that path is not protected", role, ROLES[role].label,
                    ROLES[role].space)
    if not targets:
        wanted = ", ".join(ROLES[r].pattern.pattern for r in ROLES if r in roles)
        raise TargetError(f"no trainable target in {type(model).__name__}: searched {searched} matching layer(s) "
                          f"for patterns {wanted} (sets: {', '.join(sets)}) with LoRA factors or trainable weights")
    return targets
