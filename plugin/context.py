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

import logging

import torch
from torch import nn

from .embeddings import POOLED
from .errors import TargetError
from .subspace import ConceptSubspace
from .targets import basis_for, canonical_name, role_of

log = logging.getLogger(__name__)

READER_ROLES = ("key", "value", "pooled")


def context_readers(model: nn.Module, subspace: ConceptSubspace) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module, basis) for every layer of ``model`` that reads text states, trainable or not.

    ``model`` is the module that runs the forward pass: the UNet (plain, PEFT-wrapped or patched by
    a kohya-style network), not the network object. The pooled path is included when the subspace
    has a pooled basis (the time-id columns of its input stay as they are).
    """
    context = subspace.basis()
    readers = []
    for raw_name, module in model.named_modules():
        name = canonical_name(raw_name)
        role = role_of(name)
        if role not in READER_ROLES:
            continue
        linear = getattr(module, "base_layer", module)
        in_features = getattr(linear, "in_features", None)
        if in_features is None:
            continue
        if role == "pooled" and POOLED not in subspace.bases:
            log.warning("%s reads the pooled text embedding but the subspace has no pooled basis (build it with "
                        "from_text_encoders for SDXL); its input is not projected", name)
            continue
        _, basis = basis_for(role, name, module, subspace, context, in_features, linear.out_features, {})
        readers.append((name, module, basis))
    if not readers:
        raise TargetError(f"project_context: no layer of {type(model).__name__} reads text states (searched for "
                          f"attn2.to_k / attn2.to_v / add_embedding.linear_1); pass the UNet itself (kohya: "
                          f"base_model=)")
    return readers


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


class ContextProjector:
    """Forward pre-hooks that project the text states each reader of ``model`` receives (see module doc)."""

    def __init__(self, model: nn.Module, subspace: ConceptSubspace) -> None:
        self.model = model
        found = context_readers(model, subspace)
        self.readers = [name for name, _, _ in found]
        self._handles = [m.register_forward_pre_hook(_projecting_hook(b), with_kwargs=True) for _, m, b in found]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)
