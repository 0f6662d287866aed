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

from .errors import TargetError
from .hooks import Hook
from .roles import ROLES, basis_for, canonical_name, role_of
from .subspace import ConceptSubspace

log = logging.getLogger(__name__)


def context_readers(model: nn.Module, subspace: ConceptSubspace) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module, basis) for every layer of ``model`` whose role reads text states, trainable or not.

    ``model`` is the module that runs the forward pass: the UNet (plain, PEFT-wrapped or patched by
    a kohya-style network), not the network object. A reader whose space the subspace lacks (SDXL's
    pooled path with an SD1-style subspace) is left out with a warning; padded rows (the pooled
    columns) leave the columns after the basis as they are.
    """
    readers = []
    warned: set[str] = set()
    for raw_name, module in model.named_modules():
        name = canonical_name(raw_name)
        role = role_of(name)
        if role is None or not ROLES[role].reads_text:
            continue
        linear = getattr(module, "base_layer", module)
        in_features = getattr(linear, "in_features", None)
        if in_features is None:
            continue
        if ROLES[role].space not in subspace.bases:
            if role not in warned:
                log.warning("%s reads the %s text embedding but the subspace has no %r basis (build it from all "
                            "of the model's text encoders); its input is not projected", name, ROLES[role].space,
                            ROLES[role].space)
                warned.add(role)
            continue
        _, basis = basis_for(role, name, subspace.bases, in_features)
        readers.append((name, module, basis))
    if not readers:
        labels = " / ".join(r.label for r in ROLES.values() if r.reads_text)
        raise TargetError(f"project_context: no layer of {type(model).__name__} reads text states (searched for "
                          f"{labels}); pass the UNet itself (kohya: base_model=)")
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


class ContextProjector(Hook):
    """Forward pre-hooks that project the text states each reader of ``model`` receives (see module doc).

    The readers and their bases come from ``subspace`` when it attaches (on construction, which
    fails with ``TargetError`` when ``model`` has no reader; and on every ``attach`` after ``detach``,
    so re-encoding is: detach, set ``subspace``, attach).
    """

    def __init__(self, model: nn.Module, subspace: ConceptSubspace) -> None:
        super().__init__()
        self.model = model
        self.subspace = subspace
        self.readers: list[str] = []
        self.attach()

    def _install(self) -> list:
        found = context_readers(self.model, self.subspace)
        self.readers = [name for name, _, _ in found]
        return [m.register_forward_pre_hook(_projecting_hook(b), with_kwargs=True) for _, m, b in found]

    @property
    def active(self) -> bool:
        """The same as ``attached`` (the name used before hooks shared one interface)."""
        return self.attached
