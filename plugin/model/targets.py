"""The tensors the exclusion constrains: ``Target``, and the LoRA layouts whose factors it can constrain.

Recognised layouts: diffusers UNets (full weights), PEFT LoRA (``lora_A``/``lora_B``, base layer
renamed ``base_layer``), kohya-style LoRA modules (``lora_down``/``lora_up``, named
``lora_unet_..._attn2_to_k``, diffusers or SAI/SDXL paths; LyCORIS' LoCon follows it). Which
layers are targets, and against which basis, is the role registry's (``concept_exclusion.model.roles``);
finding them in a model is the plan's (``concept_exclusion.model.plan``).

A ``Target`` says which tensor is constrained and on which side:
- input side: ``dW @ basis == 0`` (the layer's reading of the basis directions never changes);
- output side: ``basis.T @ dW == 0`` (the layer's output never moves along the basis).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from concept_exclusion.errors import TargetError

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

    def product(self, param: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """The LoRA delta ``up @ down`` from this target's two factors (``param`` is down on the input side)."""
        return other @ param if self.side == "input" else param @ other

    def leakage(self, delta: torch.Tensor) -> float:
        """||constraint part of ``delta``|| / ||delta|| (``delta @ U``, output side ``U^T @ delta``); 0 for a zero delta.

        The one definition of leakage: the exclusion's (change since attach) and a written file's (the LoRA
        delta it holds) both measure with it."""
        basis = self.basis.to(delta.dtype)
        part = delta @ basis if self.side == "input" else basis.T @ delta
        norm = float(delta.norm())
        return float(part.norm()) / norm if norm > 0 else 0.0


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


def unsupported_factor(module: nn.Module) -> str | None:
    """The attribute of a LoHa/LoKr/OFT module that cannot be projected exactly, or None."""
    return next((attr for attr in _UNSUPPORTED_FACTORS if getattr(module, attr, None) is not None), None)
