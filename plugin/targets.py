"""Finding the weights that read the concept, and the basis each one's update must avoid.

Recognised layouts: diffusers UNets (full weights), PEFT LoRA (``lora_A``/``lora_B``, base layer
renamed ``base_layer``), kohya-style LoRA modules (``lora_down``/``lora_up``, named
``lora_unet_..._attn2_to_k``, diffusers or SAI/SDXL paths; LyCORIS' LoCon follows it), and
SDXL's pooled path (``add_embedding.linear_1`` / SAI ``label_emb.0.0``, pooled columns only).

A ``Target`` says which tensor is constrained and on which side:
- input side: ``dW @ basis == 0`` (the layer's reading of the basis directions never changes);
- output side: ``basis.T @ dW == 0`` (the layer's output never moves along the basis).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .embeddings import CONTEXT, POOLED
from .errors import SubspaceError, TargetError
from .subspace import ConceptSubspace

log = logging.getLogger(__name__)

ROLE_PATTERNS = {
    "key": re.compile(r"attn2[._]to_k$"),
    "value": re.compile(r"attn2[._]to_v$"),
    "query": re.compile(r"attn2[._]to_q$"),
    "out": re.compile(r"attn2[._]to_out[._]0$"),
    "pooled": re.compile(r"(add_embedding[._]linear_1|label_emb[._]0[._]0)$"),
}
SET_ROLES = {"kv": ("key", "value", "pooled"), "attention": ("key", "value", "pooled", "query", "out")}
_WRAPPER_PARTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
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


def canonical_name(name: str) -> str:
    """Module path without training wrappers (DDP/compile/FSDP ``module.`` parts, PEFT ``base_model.model.``)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    text = ".".join(parts)
    while text.startswith("base_model.model."):
        text = text[len("base_model.model."):]
    return text


def role_of(name: str) -> str | None:
    for role, pattern in ROLE_PATTERNS.items():
        if pattern.search(name):
            return role
    return None


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


def _attention_index(base_model: nn.Module | None, model: nn.Module) -> dict[str, nn.Module]:
    """Cross-attention modules (those with ``heads`` and ``to_k``) by canonical path and by kohya path."""
    index: dict[str, nn.Module] = {}
    for root in (model, base_model):
        if root is None:
            continue
        for name, m in root.named_modules():
            if hasattr(m, "heads") and hasattr(m, "to_k") and canonical_name(name).endswith("attn2"):
                path = canonical_name(name)
                index[path] = m
                index["lora_unet_" + path.replace(".", "_")] = m
    return index


def _base_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a (possibly PEFT-wrapped) Linear applies before any adapter."""
    inner = getattr(linear, "base_layer", linear)
    return inner.weight.detach()


def head_basis(weight: torch.Tensor, basis: torch.Tensor, heads: int, rtol: float = 1e-6) -> torch.Tensor:
    """Block-diagonal orthonormal basis of span(W_h @ U) per head h: [out, sum of per-head ranks], float64."""
    w = weight.detach().double().cpu()
    out_dim = w.shape[0]
    if out_dim % heads:
        raise TargetError(f"output dimension {out_dim} is not divisible by {heads} heads")
    dh = out_dim // heads
    blocks = []
    for h in range(heads):
        m = w[h * dh:(h + 1) * dh] @ basis
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        keep = int((s > s.max().clamp_min(1e-300) * rtol).sum()) if s.numel() and float(s.max()) > 0 else 0
        block = torch.zeros(out_dim, keep, dtype=torch.float64)
        # a head whose whole space is constrained gets the identity: (I - Q Q^T) x is then exactly 0
        block[h * dh:(h + 1) * dh] = torch.eye(dh, dtype=torch.float64) if keep == dh else u[:, :keep]
        blocks.append(block)
    return torch.cat(blocks, dim=1)


def find_targets(model: nn.Module, subspace: ConceptSubspace, target_sets: Iterable[str],
                 base_model: nn.Module | None = None) -> list[Target]:
    """Every trainable tensor in ``model`` that the named target sets constrain, with its basis.

    ``base_model`` is the UNet that kohya-style LoRA modules patch; it is needed only for the
    'attention' set, whose query/output bases depend on the base key/value weights.
    """
    sets = tuple(target_sets)
    for s in sets:
        if s not in SET_ROLES:
            raise TargetError(f"unknown target set {s!r} (known: {', '.join(SET_ROLES)})")
    roles = {r for s in sets for r in SET_ROLES[s]}
    context = subspace.basis(CONTEXT)
    attention = _attention_index(base_model, model) if roles & {"query", "out"} else {}
    targets: list[Target] = []
    searched = 0
    skipped_pooled = False
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
        full = None
        weight_holder = getattr(module, "base_layer", module)
        if isinstance(weight_holder, nn.Linear) and weight_holder.weight.requires_grad:
            full = weight_holder.weight
        if not factors and full is None:
            continue
        if role == "pooled" and POOLED not in subspace.bases:
            skipped_pooled = True
            continue
        in_features = factors[0][1].shape[1] if factors else full.shape[1]
        out_features = factors[0][2].shape[0] if factors else full.shape[0]
        side, basis = basis_for(role, name, module, subspace, context, in_features, out_features, attention)
        for adapter, down, up in factors:
            suffix = "" if len(factors) == 1 else f"[{adapter}]"
            if side == "input":
                targets.append(Target(name + suffix, role, "lora", side, down, up, basis))
            else:
                targets.append(Target(name + suffix, role, "lora", side, up, down, basis))
        if full is not None:
            targets.append(Target(name + (":base" if factors else ""), role, "full", side, full, None, basis))
    if skipped_pooled:
        log.warning("the model's pooled text path (add_embedding) is trainable but the subspace has no pooled "
                    "basis (build it with from_text_encoders for SDXL); that path is not protected")
    if not targets:
        wanted = ", ".join(p.pattern for r, p in ROLE_PATTERNS.items() if r in roles)
        raise TargetError(f"no trainable target in {type(model).__name__}: searched {searched} matching layer(s) "
                          f"for patterns {wanted} (sets: {', '.join(sets)}) with LoRA factors or trainable weights")
    return targets


def basis_for(role: str, name: str, module: nn.Module, subspace: ConceptSubspace, context: torch.Tensor,
              in_features: int, out_features: int, attention: dict[str, nn.Module]) -> tuple[str, torch.Tensor]:
    """(side, basis) a layer of ``role`` is constrained against: key/value/pooled on their input (the pooled basis
    zero-padded over the time-id columns), query/out against their attention module's per-head spans."""
    if role in ("key", "value"):
        if in_features != context.shape[0]:
            raise SubspaceError(f"{name}: reads {in_features}-d text embeddings but the concept basis is "
                                f"{context.shape[0]}-d; build the subspace with this model's own text encoder(s)")
        return "input", context
    if role == "pooled":
        pooled = subspace.basis(POOLED)
        if in_features < pooled.shape[0]:
            raise SubspaceError(f"{name}: has {in_features} inputs, fewer than the {pooled.shape[0]}-d pooled basis")
        padded = torch.zeros(in_features, pooled.shape[1], dtype=torch.float64)
        padded[:pooled.shape[0]] = pooled
        return "input", padded
    attn_path = re.sub(r"[._]to_(q|out[._]0)$", "", name)
    attn = attention.get(attn_path)
    if attn is None:
        raise TargetError(f"{name}: the 'attention' target set needs the attention module {attn_path!r} "
                          f"(pass base_model= the UNet that the LoRA network patches)")
    if role == "query":
        w_k = _base_weight(attn.to_k)
        if w_k.shape[1] != context.shape[0]:
            raise SubspaceError(f"{attn_path}.to_k reads {w_k.shape[1]}-d text embeddings but the concept "
                                f"basis is {context.shape[0]}-d")
        return "output", head_basis(w_k, context, attn.heads)
    w_v = _base_weight(attn.to_v)
    if w_v.shape[1] != context.shape[0]:
        raise SubspaceError(f"{attn_path}.to_v reads {w_v.shape[1]}-d text embeddings but the concept "
                            f"basis is {context.shape[0]}-d")
    return "input", head_basis(w_v, context, attn.heads)
