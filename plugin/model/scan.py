"""One walk of a module tree: every module the exclusion may constrain, hook or refuse, found once.

Invariant: ``scan`` calls ``named_modules()`` on its root exactly once; everything after it (the plan,
re-encoding) reads the ``Scan`` instead of walking the model again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from concept_exclusion.model.roles import MMDIT_ROLES, canonical_name, role_of


@dataclass(frozen=True)
class Layer:
    """A module whose name matches a role row (kohya LoRA modules by their ``lora_name``)."""

    name: str
    role: str
    module: nn.Module


@dataclass
class Scan:
    """What one ``named_modules()`` walk of a module tree found."""

    root: nn.Module
    layers: list[Layer] = field(default_factory=list)
    attention: dict[str, nn.Module] = field(default_factory=dict)  # by canonical and by kohya ``lora_unet_`` path
    encoder_parts: list[str] = field(default_factory=list)  # text-encoder modules (or kohya TE LoRAs) that train
    fsdp1: str | None = None  # the first module wrapped by FullyShardedDataParallel (FSDP1)

    @property
    def is_mmdit(self) -> bool:
        """Whether this tree has an MMDiT text reader (Flux, SD3: only the entrance reads the encoders)."""
        return any(layer.role in MMDIT_ROLES for layer in self.layers)


def _fsdp1_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return FullyShardedDataParallel


def scan(root: nn.Module) -> Scan:
    """Walk ``root`` once and record every module the plan may need."""
    found = Scan(root)
    fsdp1 = _fsdp1_class()
    for raw, module in root.named_modules():
        if fsdp1 is not None and found.fsdp1 is None and isinstance(module, fsdp1):
            found.fsdp1 = raw or type(root).__name__
        if hasattr(module, "heads"):
            path = canonical_name(raw)
            found.attention[path] = module
            found.attention["lora_unet_" + path.replace(".", "_")] = module
        kind = type(module).__name__
        lora_name = str(getattr(module, "lora_name", "") or "")
        is_encoder = kind.startswith("CLIPTextModel") or kind.startswith("T5Encoder")
        if raw and (is_encoder or lora_name.startswith("lora_te")) and any(p.requires_grad for p in module.parameters()):
            found.encoder_parts.append(raw)
        name = canonical_name(lora_name or raw)
        role = role_of(name)
        if role is not None:
            found.layers.append(Layer(name, role, module))
    return found


def trainable_weight(module: nn.Module) -> nn.Parameter | None:
    """The layer's own (or PEFT base layer's) Linear weight when it trains, else None."""
    holder = getattr(module, "base_layer", module)
    if isinstance(holder, nn.Linear) and holder.weight.requires_grad:
        return holder.weight
    return None
